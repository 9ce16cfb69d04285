"""``speechssl plot RUN_DIR``: PNG plots of the training curves in ``RUN_DIR/metrics.jsonl``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Plot the training curves of a run from RUN_DIR/metrics.jsonl (written by 'speechssl pretrain'):
loss terms (train and valid), contrastive accuracy, codebook perplexities, data2vec 2.0's target and
prediction variance and teacher decay, the frozen-upstream probe
scores (probe.* settings), learning rate, gradient norm and throughput, one PNG per panel group plus overview.png with all of them. The PNGs go to
RUN_DIR/plots/ (regenerated on every call, so it works while the run is training) or to --out.

Example:
  speechssl pretrain recipes/wav2vec2_tiny.yaml task.data=manifests/demo checkpoint.save_dir=runs/tiny
  speechssl plot runs/tiny          # -> runs/tiny/plots/overview.png, loss.png, accuracy.png, ...
"""

# file stem -> (title, metric keys); a panel is drawn when any of its keys was logged.
PANELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "loss": ("loss per frame (nats)", ("loss", "contrastive")),
    "loss_terms": ("extra loss terms", ("diversity", "feature_pen")),
    "accuracy": ("accuracy", ("accuracy",)),
    "error_rate": ("error rate % (CTC, greedy)", ("wer", "cer")),
    "emit_ratio": ("CTC symbols emitted / target tokens", ("emit_ratio",)),
    "frame_std_ratio": ("CTC output change over frames / over symbols (~0: collapsed)", ("frame_std_ratio",)),
    "probe_error_rate": ("frozen-upstream ASR probe, valid error rate %", ("probe_cer", "probe_wer")),
    "probe_accuracy": ("frozen-upstream speaker-ID probe, valid accuracy %", ("probe_accuracy",)),
    "perplexity": ("codebook perplexity", ("code_perplexity", "prob_perplexity")),
    "variance": ("data2vec 2.0: std of targets / predictions per channel", ("target_var", "pred_var")),
    "ema_decay": ("data2vec 2.0: teacher EMA decay", ("ema_decay",)),
    "lr": ("learning rate", ("lr",)),
    "grad_norm": ("gradient norm", ("grad_norm",)),
    "throughput": ("audio seconds per second", ("audio_sec_per_sec",)),
    "temperature": ("Gumbel temperature", ("temp",)),
}


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[float], list[float]]:
    pts = [(r["update"], r[key]) for r in records
           if r.get("split") == split and isinstance(r.get(key), (int, float)) and "update" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _draw(ax, records: list[dict[str, Any]], title: str, keys: tuple[str, ...]) -> bool:
    drawn = False
    for key in keys:
        for split, style in (("train", "-"), ("valid", "o--")):
            x, y = _series(records, split, key)
            if x:
                ax.plot(x, y, style, label=f"{split} {key}", markersize=3)
                drawn = True
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if keys == ("lr",):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return drawn


def _save(fig, path: Path) -> None:
    from speechssl.utils.io import atomic_open

    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for ``run_dir`` into ``out_dir`` (default ``run_dir/plots``); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from speechssl.train.metrics import read_metrics

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: RUN_DIR must be a checkpoint.save_dir of a training run")
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no records yet (the first is written after common.log_interval updates)")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written, shown = [], []
    for stem, (title, keys) in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        if _draw(ax, records, title, keys):
            fig.tight_layout()
            _save(fig, out / f"{stem}.png")
            written.append(out / f"{stem}.png")
            shown.append((title, keys))
        plt.close(fig)
    cols = 2
    rows = max(1, (len(shown) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.6 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, shown):
        _draw(ax, records, title, keys)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    _save(fig, out / "overview.png")
    plt.close(fig)
    return [out / "overview.png"] + written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run's checkpoint.save_dir (holds metrics.jsonl)")
    p.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots)")
    p.add_argument("--force", action="store_true", help="replace PNGs already in --out")


def run(args: argparse.Namespace) -> int:
    if args.out and not args.force:
        existing = [Path(args.out) / f"{s}.png" for s in ["overview", *PANELS] if (Path(args.out) / f"{s}.png").exists()]
        if existing:
            print(f"speechssl plot: {existing[0]} exists; pass --force to replace the plots in {args.out}")
            return 2
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"speechssl plot: {exc}")
        return 1
    for p in paths:
        print(p)
    return 0
