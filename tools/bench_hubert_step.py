"""Benchmark one HuBERT BASE pretraining step, CPU or CUDA: speechssl against torchaudio's hubert_pretrain_base.

A step = forward + backward + AdamW step on a batch of --batch x --seconds of 16 kHz audio with K=100
cluster labels, for:

  speechssl   HubertModel (hubert_base_config) + HubertCriterion: span masking on the model's device,
              masked and unmasked logits (cosine / 0.1 against the label embeddings), cross-entropy at
              masked frames, feature penalty 10;
  torchaudio  ``torchaudio.models.hubert_pretrain_base`` (same BASE network, its own numpy span masking,
              masked and unmasked logits) with the loss of torchaudio's HuBERT example
              (cross-entropy over the masked logits + 10 x feature penalty x frames).

Both use BASE's dropouts (0.1), mask_prob 0.8, feature_grad_mult 0.1 and LayerDrop --layerdrop (default
0 so every step does the same work). Steps are interleaved (one of each in turn), so load from other
processes hits both alike; times are medians over --steps after --warmup. fp32 and bf16 autocast.
Labels are at the frame rate (50/s: torchaudio needs them aligned); speechssl's 100/s path only adds an
index gather. OMP_WAIT_POLICY defaults to PASSIVE (see tools/bench_pretrain_step.py). --device cuda runs
on the GPU (synchronised timers, peak ``torch.cuda.max_memory_allocated`` per implementation, measured
over its own steps, and the CUDA profiler).

  python tools/bench_hubert_step.py [--steps 5] [--warmup 2] [--threads 2] [--batch 4] [--seconds 4]
      [--profile speechssl torchaudio] [--device cuda] [--classes 500]
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import os
import statistics
import time
from contextlib import nullcontext

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from speechssl.config import CriterionConfig  # noqa: E402
from speechssl.models import build_model, hubert_base_config  # noqa: E402
from speechssl.objectives import build_objective  # noqa: E402

IMPLS = ("speechssl", "torchaudio")
K = 100


def synchronize(device: torch.device) -> None:
    """Wait for the device (CUDA) so that a host timer reads what it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step(abc.ABC):
    """One implementation's training step, timed by phase (forward incl. loss, backward, optimizer)."""

    def __init__(self, model: torch.nn.Module, device: torch.device = torch.device("cpu")):
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6,
                                           weight_decay=0.01, fused=True)

    @abc.abstractmethod
    def loss(self, source: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar training loss for ``source`` (B, T) and frame labels ``labels`` (B, L), on the device."""

    def __call__(self, source: torch.Tensor, labels: torch.Tensor, bf16: bool) -> dict[str, float]:
        sync = lambda: synchronize(self.device)  # noqa: E731
        sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = self.loss(source, labels)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


class SpeechsslStep(Step):
    def __init__(self, layerdrop: float, device: torch.device = torch.device("cpu"), classes: int = K, cfg=None):
        cfg = cfg or dataclasses.replace(hubert_base_config([classes], 50.0), encoder_layerdrop=layerdrop)
        super().__init__(build_model(cfg), device)
        self.objective = build_objective(CriterionConfig(name="hubert", loss_weights=[10.0]), cfg)

    def loss(self, source, labels):
        out = self.objective(self.model, {"source": source, "target_list": [labels]})
        return out.loss / out.sample_size


class TorchaudioStep(Step):
    def __init__(self, layerdrop: float, device: torch.device = torch.device("cpu"), classes: int = K,
                 model: torch.nn.Module | None = None):
        import torchaudio

        super().__init__(model or torchaudio.models.hubert_pretrain_base(encoder_layer_drop=layerdrop,
                                                                        num_classes=classes), device)

    def loss(self, source, labels):
        logit_m, logit_u, features_pen = self.model(source, labels)
        with torch.autocast(source.device.type, enabled=False):  # torchaudio's example: the loss in fp32
            target = torch.zeros(logit_m.shape[0], dtype=torch.long, device=logit_m.device)
            loss = F.cross_entropy(logit_m.float(), target, reduction="sum")
            loss = loss + 10.0 * features_pen * logit_m.shape[0]
        return loss / logit_m.shape[0]


BUILDERS = {"speechssl": SpeechsslStep, "torchaudio": TorchaudioStep}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


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
    ap.add_argument("--profile", nargs="*", default=[], choices=IMPLS, help="print torch.profiler tables")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--classes", type=int, default=K, help="cluster labels (100: iteration 1, 500: iteration 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    steps = {impl: BUILDERS[impl](args.layerdrop, device, args.classes) for impl in args.impls}
    source = torch.randn(args.batch, int(args.seconds * 16000), device=device)
    L = source.shape[1]
    for _, kernel, stride in hubert_base_config().conv_feature_layers:  # frames of the BASE conv stack
        L = (L - kernel) // stride + 1
    labels = torch.randint(0, args.classes, (args.batch, L), device=device)
    audio = args.batch * args.seconds
    where = torch.cuda.get_device_name(device) if cuda else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch} x {args.seconds} s, K={args.classes}, "
          f"layerdrop {args.layerdrop}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"load average before: {load()}")
    medians: dict[tuple[str, str], dict[str, float]] = {}
    peaks: dict[tuple[str, str], int] = {}
    for precision in args.precisions:
        record: dict[str, list[dict[str, float]]] = {impl: [] for impl in steps}
        for i in range(args.warmup + args.steps):
            for impl, step in steps.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                t = step(source, labels, precision == "bf16")
                if cuda:  # both models' weights and optimizer states are resident: compare the growth
                    peaks[(impl, precision)] = max(peaks.get((impl, precision), 0),
                                                   torch.cuda.max_memory_allocated(device))
                if i >= args.warmup:
                    record[impl].append(t)
        for impl, rows in record.items():
            medians[(impl, precision)] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            medians[(impl, precision)]["min"] = min(r["step"] for r in rows)
    print(f"load average after: {load()}\n")
    print(f"{'impl':<13}{'precision':<10}{'step s':>8}{'min s':>8}{'fwd':>7}{'bwd':>7}{'opt':>7}{'audio s/s':>11}"
          + (f"{'peak GiB':>10}" if cuda else ""))
    for (impl, precision), m in medians.items():
        print(f"{impl:<13}{precision:<10}{m['step']:>8.3f}{m['min']:>8.3f}{m['forward']:>7.3f}{m['backward']:>7.3f}"
              f"{m['optimizer']:>7.3f}{audio / m['step']:>11.2f}"
              + (f"{peaks[(impl, precision)] / 2**30:>10.2f}" if cuda else ""))
    for precision in args.precisions:
        ours, ref = medians.get(("speechssl", precision)), medians.get(("torchaudio", precision))
        if ours and ref:
            print(f"{precision}: speechssl / torchaudio throughput = {ref['step'] / ours['step']:.2f}x "
                  f"(min-step ratio {ref['min'] / ours['min']:.2f}x)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        for impl in args.profile:
            for precision in args.precisions:
                with profile(activities=activities) as prof:
                    for _ in range(2):
                        steps[impl](source, labels, precision == "bf16")
                    synchronize(device)
                print(f"\nprofile: {impl} {precision} (2 steps)")
                print(prof.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows))


if __name__ == "__main__":
    main()
