"""Benchmark one wav2vec 2.0 BASE pretraining step against transformers and torchaudio, on CPU or CUDA.

A step = forward + backward + AdamW step on a batch of --batch x --seconds of 16 kHz audio, for:

  speechssl     speechssl's model + objective (masking, negatives, InfoNCE, diversity, feature penalty);
  transformers  transformers' Wav2Vec2ForPreTraining with the same BASE configuration, including its own
                numpy ``_compute_mask_indices`` / ``_sample_negative_indices`` helpers every step;
  torchaudio    torchaudio's ``wav2vec2_base`` encoder (no masking, quantizer or contrastive head) with a
                mean-square loss on its output: a lower bound for the cost of the shared network.

All three use the BASE dropouts (0.1; activation dropout 0) and the same LayerDrop (--layerdrop, default
0 so that every step does the same work). Steps are interleaved (one of each in turn), so load from
other processes hits every implementation alike; the load average is printed before and after. Times
are medians over --steps after --warmup steps; throughput is audio seconds per second. fp32 and bf16
autocast (forward under autocast, as a trainer does) are measured. Every implementation uses the same
fused AdamW. OMP_WAIT_POLICY defaults to PASSIVE here (see below).

--device cuda runs the models on the GPU: timers after ``torch.cuda.synchronize()``, memory as
``torch.cuda.max_memory_allocated`` (--memory), the profiler with CUDA activity (sorted by device time).

--memory runs each implementation and precision in its own subprocess and reports its peak memory (CPU:
RSS, ``VmHWM``; CUDA: ``max_memory_allocated``) and the growth over the memory before the first step
(activations + optimizer state).
--profile prints the torch.profiler op table of the named implementations' steps.
--phases splits speechssl's step: conv extractor (fwd+bwd), feature projection + Transformer (fwd+bwd,
from fixed conv features), the rest (masking, quantizer, negatives, loss: the difference to a full step)
and the optimizer step.

  python tools/bench_pretrain_step.py [--steps 5] [--warmup 2] [--threads 2] [--memory] [--profile speechssl]
  python tools/bench_pretrain_step.py --device cuda --batch 5 --seconds 15.625 --precisions bf16 --memory
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

# Shared machines: with OpenMP's default spin-waiting, other processes on the same cores slow a 2-thread
# step several-fold and unevenly; passive waiting keeps the comparison fair. Export OMP_WAIT_POLICY=ACTIVE
# to measure the default behaviour (it must be set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from speechssl.config import CriterionConfig  # noqa: E402
from speechssl.models import build_model, wav2vec2_base_config  # noqa: E402
from speechssl.models.weights import transformers_config_kwargs  # noqa: E402
from speechssl.objectives import build_objective  # noqa: E402

IMPLS = ("speechssl", "transformers", "torchaudio")


def synchronize(device: torch.device) -> None:
    """Wait for the device (CUDA) so that a host timer reads what it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step(abc.ABC):
    """One implementation's training step, timed by phase (forward incl. loss, backward, optimizer)."""

    def __init__(self, model: torch.nn.Module, device: torch.device = torch.device("cpu")):
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]  # not data2vec 2.0's EMA teacher
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6,
                                           weight_decay=0.01, fused=True)
        self.updates = 0

    @abc.abstractmethod
    def loss(self, source: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of this implementation for ``source`` (B, T) on the step's device."""

    def __call__(self, source: torch.Tensor, bf16: bool) -> dict[str, float]:
        sync = lambda: synchronize(self.device)  # noqa: E731
        sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = self.loss(source)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if hasattr(self.model, "update_teacher"):  # data2vec 2.0: the teacher's EMA step is part of an update
            self.model.update_teacher(self.updates)
        sync()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


class SpeechsslStep(Step):
    def __init__(self, layerdrop: float, device: torch.device = torch.device("cpu"), cfg=None):
        cfg = cfg or dataclasses.replace(wav2vec2_base_config(), encoder_layerdrop=layerdrop)
        super().__init__(build_model(cfg), device)
        self.objective = build_objective(CriterionConfig(), cfg)

    def loss(self, source):
        out = self.objective(self.model, {"source": source})
        return out.loss / out.sample_size


class TransformersStep(Step):
    """transformers' Wav2Vec2ForPreTraining with its own numpy mask and negative sampling (on the host, as
    its training example), moved to the device each step."""

    def __init__(self, layerdrop: float, device: torch.device = torch.device("cpu"), cfg=None):
        import transformers
        from transformers.models.wav2vec2 import modeling_wav2vec2 as hf

        self.hf = hf
        cfg = cfg or dataclasses.replace(wav2vec2_base_config(), encoder_layerdrop=layerdrop)
        self.cfg = cfg
        config = transformers.Wav2Vec2Config(**transformers_config_kwargs(cfg))
        super().__init__(transformers.Wav2Vec2ForPreTraining(config), device)
        self.attn_implementation = config._attn_implementation

    def loss(self, source):
        B = source.shape[0]
        L = int(self.model._get_feat_extract_output_lengths(torch.tensor(source.shape[1])))
        mask = self.hf._compute_mask_indices((B, L), self.cfg.mask_prob, self.cfg.mask_length, min_masks=2)
        negatives = self.hf._sample_negative_indices((B, L), self.cfg.num_negatives, mask)
        mask = torch.from_numpy(mask).to(source.device)
        negatives = torch.from_numpy(negatives).long().to(source.device)
        out = self.model(source, mask_time_indices=mask, sampled_negative_indices=negatives)
        return out.loss / mask.sum()


class TorchaudioStep(Step):
    def __init__(self, layerdrop: float, device: torch.device = torch.device("cpu"), cfg=None):
        import torchaudio

        cfg = cfg or wav2vec2_base_config()
        super().__init__(torchaudio.models.wav2vec2_base(
            encoder_projection_dropout=cfg.dropout_input, encoder_attention_dropout=cfg.attention_dropout,
            encoder_ff_interm_dropout=cfg.activation_dropout, encoder_dropout=cfg.dropout,
            encoder_layer_drop=layerdrop), device)

    def loss(self, source):
        x, _ = self.model(source)
        return x.float().pow(2).mean()


BUILDERS = {"speechssl": SpeechsslStep, "transformers": TransformersStep, "torchaudio": TorchaudioStep}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``; unlike ``ru_maxrss`` it is not inherited from the parent)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_child(args) -> None:
    """--child: one implementation, one precision; print JSON with times and memory."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    step = BUILDERS[args.child](args.layerdrop, device)
    source = torch.randn(args.batch, int(args.seconds * 16000), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else rss_bytes()
    times = [step(source, args.child_bf16)["step"] for _ in range(args.warmup + args.steps)][args.warmup:]
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    print(json.dumps({"rss_before": before, "peak_rss": peak, "step": statistics.median(times)}))


def memory_report(args) -> None:
    what = "max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print(f"\npeak memory ({what}), one subprocess per implementation (load {load()}):")
    print(f"{'impl':<13}{'precision':<10}{'peak':>10}{'growth':>10}{'step s':>9}")
    results = {}
    for precision in args.precisions:
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--child", impl, "--steps", str(max(2, args.steps // 2)),
                   "--warmup", "1", "--threads", str(args.threads), "--batch", str(args.batch),
                   "--seconds", str(args.seconds), "--layerdrop", str(args.layerdrop), "--seed", str(args.seed),
                   "--device", args.device]
            if precision == "bf16":
                cmd.append("--child-bf16")
            stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(stdout.strip().splitlines()[-1])
            results[(impl, precision)] = r
            growth = r["peak_rss"] - r["rss_before"]
            print(f"{impl:<13}{precision:<10}{r['peak_rss'] / 2**30:>9.2f}G{growth / 2**30:>9.2f}G{r['step']:>9.2f}")
    for precision in args.precisions:
        if ("speechssl", precision) in results and ("transformers", precision) in results:
            ours, ref = results[("speechssl", precision)], results[("transformers", precision)]
            print(f"{precision}: speechssl / transformers peak {ours['peak_rss'] / ref['peak_rss']:.2f}, "
                  f"growth {(ours['peak_rss'] - ours['rss_before']) / (ref['peak_rss'] - ref['rss_before']):.2f}")


def profile_activities(device: torch.device) -> tuple[list, str]:
    """torch.profiler activities for ``device`` and the column to sort its table by."""
    from torch.profiler import ProfilerActivity

    if device.type == "cuda":
        return [ProfilerActivity.CPU, ProfilerActivity.CUDA], "self_device_time_total"
    return [ProfilerActivity.CPU], "self_cpu_time_total"


def profile_report(args, steps: dict, source: torch.Tensor) -> None:
    from torch.profiler import profile

    activities, sort_by = profile_activities(source.device)
    for impl in args.profile:
        for precision in args.precisions:
            with profile(activities=activities) as prof:
                for _ in range(2):
                    steps[impl](source, precision == "bf16")
                synchronize(source.device)
            print(f"\nprofile: {impl} {precision} (2 steps)")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows))


def phases_report(args, step: SpeechsslStep, source: torch.Tensor) -> None:
    model = step.model
    features = model.feature_extractor(source).detach()

    def extractor(bf16: bool) -> None:
        with torch.autocast(source.device.type, dtype=torch.bfloat16, enabled=bf16):
            y = model.extract_conv_features(source)
        y.float().pow(2).mean().backward()
        synchronize(source.device)

    def encoder(bf16: bool) -> None:
        with torch.autocast(source.device.type, dtype=torch.bfloat16, enabled=bf16):
            y, _ = model.encoder(model.feature_projection(features)[0])
        y.float().pow(2).mean().backward()
        synchronize(source.device)

    print(f"\nspeechssl step by phase, min of {args.steps} (load {load()}):")
    for precision in args.precisions:
        bf16 = precision == "bf16"
        best: dict[str, float] = {}
        for _ in range(args.steps):
            for name, fn in (("extractor", extractor), ("encoder", encoder)):
                synchronize(source.device)
                t0 = time.perf_counter()
                fn(bf16)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            t = step(source, bf16)
            for name in ("step", "optimizer"):
                best[name] = min(best.get(name, float("inf")), t[name])
        rest = best["step"] - best["optimizer"] - best["extractor"] - best["encoder"]
        parts = {"extractor": best["extractor"], "encoder": best["encoder"], "rest": rest,
                 "optimizer": best["optimizer"]}
        print(f"  {precision}: step {best['step']:.2f} s = " + ", ".join(
            f"{k} {v:.2f} s ({100 * v / best['step']:.0f}%)" for k, v in parts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation and precision")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0, help="audio per utterance")
    ap.add_argument("--layerdrop", type=float, default=0.0)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS in subprocesses")
    ap.add_argument("--memory-only", action="store_true", help="only the --memory measurement")
    ap.add_argument("--profile", nargs="*", default=[], choices=IMPLS, help="print torch.profiler tables")
    ap.add_argument("--profile-rows", type=int, default=20)
    ap.add_argument("--phases", action="store_true", help="split speechssl's step into phases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--child-bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return

    if args.memory_only:
        memory_report(args)
        return
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    steps = {impl: BUILDERS[impl](args.layerdrop, device) for impl in args.impls}
    source = torch.randn(args.batch, int(args.seconds * 16000), device=device)
    audio = args.batch * args.seconds
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch} x {args.seconds} s, "
          f"layerdrop {args.layerdrop}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    if "transformers" in steps:
        print(f"transformers attention implementation: {steps['transformers'].attn_implementation}")
    print(f"load average before: {load()}")
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for precision in args.precisions:
        record: dict[str, list[dict[str, float]]] = {impl: [] for impl in steps}
        for i in range(args.warmup + args.steps):
            for impl, step in steps.items():
                t = step(source, precision == "bf16")
                if i >= args.warmup:
                    record[impl].append(t)
        for impl, rows in record.items():
            medians[(impl, precision)] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            medians[(impl, precision)]["min"] = min(r["step"] for r in rows)
    print(f"load average after: {load()}\n")
    print(f"{'impl':<13}{'precision':<10}{'step s':>8}{'min s':>8}{'fwd':>7}{'bwd':>7}{'opt':>7}{'audio s/s':>11}")
    for (impl, precision), m in medians.items():
        print(f"{impl:<13}{precision:<10}{m['step']:>8.2f}{m['min']:>8.2f}{m['forward']:>7.2f}{m['backward']:>7.2f}"
              f"{m['optimizer']:>7.2f}{audio / m['step']:>11.2f}")
    for precision in args.precisions:
        ours = medians.get(("speechssl", precision))
        for ref in ("transformers", "torchaudio"):
            if ours and (ref, precision) in medians:
                ratio = medians[(ref, precision)]["step"] / ours["step"]
                print(f"{precision}: speechssl / {ref} throughput = {ratio:.2f}x")
    if args.profile:
        profile_report(args, steps, source)
    if args.phases and "speechssl" in steps:
        phases_report(args, steps["speechssl"], source)
    if args.memory:
        del steps
        memory_report(args)


if __name__ == "__main__":
    main()
