"""Benchmark one data2vec 2.0 pretraining step against one wav2vec 2.0 step on the same audio, CPU or CUDA.

A step = forward + loss + backward + AdamW step (+ data2vec 2.0's teacher EMA update) on the same batch of
--batch x --seconds of 16 kHz audio (equal audio per batch, as the issue asks), for:

  data2vec2  Data2Vec2Model + Data2Vec2Criterion: the EMA teacher encodes each utterance once, the student
             the unmasked half of clone_batch copies (published BASE: 8), the conv decoder all frames of them;
  wav2vec2   Wav2Vec2Model + the contrastive loss (quantizer, 100 distractors, diversity, feature penalty).

The models are the published BASE configurations, or the model sections of recipes (--d2v-recipe
recipes/data2vec2_tiny.yaml --w2v-recipe recipes/wav2vec2_tiny.yaml: the demo's CPU recipes). LayerDrop is
off so that every step does the same work. Steps are interleaved (one of each in turn), so load from other
processes hits both alike; times are medians over --steps after --warmup, fp32 and/or bf16 autocast.
OMP_WAIT_POLICY defaults to PASSIVE. --device cuda synchronises the timers and reports the peak memory.

  python tools/bench_data2vec2_step.py [--steps 5] [--warmup 2] [--threads 2] [--batch 4] [--seconds 4]
      [--d2v-recipe R] [--w2v-recipe R] [--clone-batch N] [--precisions fp32 bf16] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from speechssl.config import CriterionConfig, ModelConfig, load_config  # noqa: E402
from speechssl.models import build_model, data2vec2_base_config, wav2vec2_base_config  # noqa: E402
from speechssl.objectives import build_objective  # noqa: E402

import bench_pretrain_step  # noqa: E402  (tools/ is on sys.path when run as a script)
from bench_pretrain_step import load  # noqa: E402

IMPLS = ("data2vec2", "wav2vec2")


def model_config(recipe: str | None, default: ModelConfig) -> tuple[ModelConfig, CriterionConfig]:
    """The model and criterion sections of ``recipe`` (None: the published BASE ``default``), LayerDrop off."""
    if recipe is None:
        cfg, crit = default, CriterionConfig(name="data2vec2" if default.name == "data2vec2" else "wav2vec")
    else:
        loaded = load_config(recipe, ["task.data=unused"])
        cfg, crit = loaded.model, loaded.criterion
    return dataclasses.replace(cfg, encoder_layerdrop=0.0), crit


class Step(bench_pretrain_step.Step):
    """One speechssl model's training step, timed by phase (the teacher's EMA step counts as optimizer time)."""

    def __init__(self, cfg: ModelConfig, criterion: CriterionConfig, device: torch.device):
        super().__init__(build_model(cfg), device)
        self.objective = build_objective(criterion, cfg)

    def loss(self, source: torch.Tensor) -> torch.Tensor:
        out = self.objective(self.model, {"source": source})
        return out.loss / out.sample_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model and precision")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0, help="audio per utterance")
    ap.add_argument("--d2v-recipe", help="take data2vec 2.0's model from this recipe (default: published BASE)")
    ap.add_argument("--w2v-recipe", help="take wav2vec 2.0's model from this recipe (default: published BASE)")
    ap.add_argument("--clone-batch", type=int, default=0, help="data2vec 2.0's copies per utterance (0: the config's)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    d2v, d2v_crit = model_config(args.d2v_recipe, data2vec2_base_config())
    if args.clone_batch:
        d2v = dataclasses.replace(d2v, clone_batch=args.clone_batch)
    w2v, w2v_crit = model_config(args.w2v_recipe, wav2vec2_base_config())
    configs = {"data2vec2": (d2v, d2v_crit), "wav2vec2": (w2v, w2v_crit)}
    steps = {impl: Step(*configs[impl], device) for impl in args.impls}
    source = torch.randn(args.batch, int(args.seconds * 16000), device=device)
    audio = args.batch * args.seconds
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch} x {args.seconds} s = {audio:g} s of audio, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    for impl, step in steps.items():
        n = sum(p.numel() for p in step.model.parameters() if p.requires_grad)
        cfg = configs[impl][0]
        extra = f", clone_batch {cfg.clone_batch}" if impl == "data2vec2" else ""
        recipe = args.d2v_recipe if impl == "data2vec2" else args.w2v_recipe
        print(f"  {impl}: {recipe or 'published BASE'}, {n / 1e6:.2f}M trained parameters, {cfg.encoder_layers} x "
              f"{cfg.encoder_embed_dim}, front-end {cfg.extractor_mode}{extra}")
    print(f"load average before: {load()}")
    results: dict[tuple[str, str], dict[str, float]] = {}
    for precision in args.precisions:
        bf16 = precision == "bf16"
        times: dict[str, list[dict[str, float]]] = {impl: [] for impl in steps}
        for i in range(args.warmup + args.steps):
            for impl, step in steps.items():
                t = step(source, bf16)
                if i >= args.warmup:
                    times[impl].append(t)
        for impl in steps:
            results[(impl, precision)] = {k: statistics.median(t[k] for t in times[impl])
                                          for k in ("forward", "backward", "optimizer", "step")}
    print(f"load average after: {load()}")
    print(f"\n{'model':<10} {'precision':<9} {'step s':>8} {'forward':>8} {'backward':>9} {'optim':>7} "
          f"{'audio s/s':>10}")
    for (impl, precision), r in results.items():
        print(f"{impl:<10} {precision:<9} {r['step']:8.3f} {r['forward']:8.3f} {r['backward']:9.3f} "
              f"{r['optimizer']:7.3f} {audio / r['step']:10.1f}")
    if len(steps) == 2:
        for precision in args.precisions:
            ratio = results[("data2vec2", precision)]["step"] / results[("wav2vec2", precision)]["step"]
            print(f"{precision}: data2vec 2.0 step / wav2vec 2.0 step = {ratio:.2f} at equal audio per batch")
    if device.type == "cuda":
        print(f"peak memory (all steps): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
