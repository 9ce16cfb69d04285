"""Training visibility: interval averages, progress line, ``metrics.jsonl``, TensorBoard, health alarms.

Records (one JSON object per line in ``save_dir/metrics.jsonl``; the same values go to TensorBoard under
``train/<key>`` and ``valid/<key>``)::

    {"split": "train", "update": 400, "epoch": 3, "loss": 3.91, "accuracy": 0.21, "code_perplexity": 410.2,
     "lr": 0.0005, "grad_norm": 1.3, "audio_sec_per_sec": 310.5, "updates_per_sec": 2.1, "time": 1.7e9, ...}

``loss`` and the loss terms are per frame (the objective's sample size) in nats; fairseq logs base 2
(divide by ln 2 = 0.693 to compare). Averages over a log interval weight every update by its sample size;
``lr`` is the last update's, throughput is over the interval's training time (data waits included,
validation and checkpointing not); ``time`` is the Unix time of the record.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

from speechssl.utils.io import atomic_write_text

# Keys averaged weighted by sample size / summed / taken from the last update / not logged.
_SUMMED = ("sample_size", "nsentences", "audio_samples", "num_masked", "skipped_updates")
_LAST = ("lr", "loss_scale", "epoch")
_NOT_LOGGED = ("skipped", "overflow", "nonfinite")
# Columns of the progress line, in order, with their format.
_SHOWN = (("loss", ".3f"), ("target_var", ".3f"), ("pred_var", ".3f"), ("contrastive", ".3f"), ("diversity", ".3f"), ("feature_pen", ".3f"),
          ("accuracy", ".3f"), ("wer", ".2f"), ("cer", ".2f"), ("emit_ratio", ".2f"), ("frame_std_ratio", ".2f"), ("probe_cer", ".1f"), ("probe_accuracy", ".1f"), ("code_perplexity", ".1f"), ("prob_perplexity", ".1f"), ("temp", ".3f"),
          ("lr", ".2e"), ("grad_norm", ".2f"), ("audio_sec_per_sec", ".0f"))


class IntervalMeter:
    """Accumulates update stats between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.weighted: dict[str, float] = {}
        self.summed: dict[str, float] = {}
        self.last: dict[str, Any] = {}
        self.weight = 0.0
        self.updates = 0
        self.grad_norm = (0.0, 0)
        self.seconds = 0.0

    def add(self, stats: dict[str, Any], seconds: float) -> None:
        """Add one update's stats; ``seconds``: its wall time (data wait included, validation not)."""
        self.seconds += seconds
        if stats.get("skipped"):
            self.summed["skipped_updates"] = self.summed.get("skipped_updates", 0) + 1
            self.summed["audio_samples"] = self.summed.get("audio_samples", 0) + stats.get("audio_samples", 0)
            return
        self.updates += 1
        w = stats.get("sample_size", 1.0)
        self.weight += w
        for k, v in stats.items():
            if k in _NOT_LOGGED or not isinstance(v, (int, float)):
                continue
            if k in _SUMMED:
                self.summed[k] = self.summed.get(k, 0) + v
            elif k in _LAST:
                self.last[k] = v
            elif k == "grad_norm":
                self.grad_norm = (self.grad_norm[0] + v, self.grad_norm[1] + 1)
            else:
                self.weighted[k] = self.weighted.get(k, 0.0) + v * w

    def summary(self, sample_rate: int) -> dict[str, Any]:
        elapsed = max(self.seconds, 1e-9)
        out: dict[str, Any] = {k: v / max(self.weight, 1e-12) for k, v in self.weighted.items()}
        out.update(self.last)
        out.update(self.summed)
        if self.grad_norm[1]:
            out["grad_norm"] = self.grad_norm[0] / self.grad_norm[1]
        out["audio_sec_per_sec"] = self.summed.get("audio_samples", 0) / sample_rate / elapsed
        out["updates_per_sec"] = self.updates / elapsed
        return out


# frame_std_ratio below this with only blanks emitted: the CTC model's encoder has collapsed (see HealthMonitor).
# Measured on the demo corpus's log-mel upstreams: fine-tuned models that read their input 0.63-0.70; runs
# stuck on the all-blank plateau for good 0.01-0.18.
COLLAPSED_FRAME_STD_RATIO = 0.3


class HealthMonitor:
    """Alarms for the usual ways self-supervised pretraining fails.

    * codebook collapse: ``code_perplexity`` (of the argmax codes, fairseq's definition, so the training
      records show it) below 10% of the codebook (groups x entries) from ``collapse_start_update`` on;
    * accuracy stuck at chance (1 / (1 + negatives)) once ``start_update`` updates are done;
    * loss diverging: smoothed loss 50% (and 0.5 nats) above its best smoothed value (off with
      ``loss_divergence=False``: a self-distillation loss rises legitimately while the teacher's targets gain
      variance);
    * CTC fine-tuning stuck emitting only blanks: ``emit_ratio`` (symbols emitted / target tokens)
      below 0.05 once ``blank_alarm_update`` updates are done; when ``frame_std_ratio`` is below
      :data:`COLLAPSED_FRAME_STD_RATIO` too, the alarm says the encoder collapsed (nearly one output for every
      frame), which waiting does not cure;
    * teacher-student collapse (data2vec 2.0): ``target_var`` below ``min_target_var`` or ``pred_var`` below
      ``min_pred_var`` once ``variance_start_update`` updates are done (fairseq stops such a run after 5000
      updates; here the log says so and the run goes on).
    Any of them is skipped when its setting is None.
    """

    def __init__(self, codebook_size: Optional[int] = None, chance_accuracy: Optional[float] = None,
                 start_update: int = 1000, blank_alarm_update: Optional[int] = None,
                 collapse_start_update: int = 100, min_target_var: Optional[float] = None,
                 min_pred_var: Optional[float] = None, variance_start_update: int = 5000,
                 loss_divergence: bool = True):
        self.codebook_size = codebook_size
        self.collapse_start_update = collapse_start_update
        self.min_target_var, self.min_pred_var = min_target_var, min_pred_var
        self.variance_start_update = variance_start_update
        self.loss_divergence = loss_divergence
        self.chance = chance_accuracy
        self.start_update = start_update
        self.blank_alarm_update = blank_alarm_update
        self.ema: Optional[float] = None
        self.best_ema = math.inf

    def check(self, record: dict[str, Any]) -> list[str]:
        alarms = []
        n = record.get("update", 0)
        ppl = record.get("code_perplexity")
        if self.codebook_size and ppl is not None and n >= self.collapse_start_update \
                and ppl < 0.1 * self.codebook_size:
            alarms.append(f"codebook collapse: code perplexity {ppl:.1f} < 10% of the {self.codebook_size} codes")
        acc = record.get("accuracy")
        if self.chance and acc is not None and n >= self.start_update and acc < 1.5 * self.chance:
            alarms.append(f"accuracy {acc:.3f} still at chance ({self.chance:.3f}) after {n} updates")
        emit = record.get("emit_ratio")
        frames = record.get("frame_std_ratio")
        only_blanks = self.blank_alarm_update is not None and emit is not None and n >= self.blank_alarm_update \
            and emit < 0.05
        if only_blanks and frames is not None and frames < COLLAPSED_FRAME_STD_RATIO:
            alarms.append(
                f"the model emits only blanks after {n} updates and its output barely changes from frame to frame "
                f"(frame_std_ratio {frames:.2f}; fine-tuned models that read their input: ~0.6-0.7): the encoder "
                "collapsed towards one output for every frame, and CTC does not leave the all-blank plateau from "
                "there. Restart from the pretrained upstream with a lower learning rate (optimization.lr; on the "
                "demo corpus 5e-4 left the log-mel wav2vec 2.0 upstream there in 3 seeds of 3, 2e-4 in none) or a "
                "longer warmup")
        elif only_blanks:
            alarms.append(
                f"the model emits only blanks after {n} updates ({100 * emit:.1f}% of the target tokens; WER stays "
                "~100%). Likely causes: learning rate too high (optimization.lr; published 3e-5..5e-5) or warmup too "
                "short; encoder unfrozen too early or too late (model.freeze_finetune_updates); a vocabulary that "
                "does not match the labels (task.labels, dict.ltr.txt / task.spm_model); too few updates yet "
                "(from-scratch and weakly pretrained models sit on the all-blank plateau for hundreds of updates)")
        if n >= self.variance_start_update:
            for key, floor in (("target_var", self.min_target_var), ("pred_var", self.min_pred_var)):
                value = record.get(key)
                if floor is not None and value is not None and value < floor:
                    alarms.append(
                        f"{key} {value:.4f} < {floor:g} (model.min_{key}): the {'teacher' if key == 'target_var' else 'student'}"
                        f"'s outputs are collapsing to a constant (the known failure of teacher-student training); "
                        "lower optimization.lr, lengthen lr_scheduler.warmup_updates, raise model.ema_decay, or resume "
                        "from an earlier checkpoint")
        loss = record.get("loss")
        if self.loss_divergence and loss is not None and math.isfinite(loss):
            self.ema = loss if self.ema is None else 0.7 * self.ema + 0.3 * loss
            self.best_ema = min(self.best_ema, self.ema)
            if self.ema > 1.5 * self.best_ema and self.ema > self.best_ema + 0.5:
                alarms.append(f"loss diverging: {self.ema:.3f} vs best {self.best_ema:.3f}")
        return alarms


def format_record(rec: dict[str, Any]) -> str:
    parts = [f"{rec['split']} | epoch {rec.get('epoch', 0):03d} | update {rec.get('update', 0):6d}"]
    parts += [f"{k} {rec[k]:{fmt}}" for k, fmt in _SHOWN if isinstance(rec.get(k), (int, float))]
    if rec.get("skipped_updates"):
        parts.append(f"skipped {int(rec['skipped_updates'])}")
    if rec.get("eta"):
        parts.append(f"eta {rec['eta']}")
    line = " | ".join(parts)
    return line + "".join(f" | ALARM: {a}" for a in rec.get("alarms", []))


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


PROGRESS_SECONDS = 30.0  # without a terminal: one progress line per this many seconds (none for quick work)


class Progress:
    """Wrap an iterable of known length with progress and ETA: a tqdm bar on a terminal (stderr), else a
    line ``desc: i/total unit (p%), eta H:MM:SS`` every :data:`PROGRESS_SECONDS` (log files stay short)."""

    def __init__(self, iterable: Any, total: int, desc: str, unit: str = "it", enabled: bool = True,
                 stream: Optional[TextIO] = None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.enabled = enabled and total > 0
        self.stream = stream

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        import time

        if not self.enabled:
            yield from self.iterable
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            yield from tqdm(self.iterable, total=self.total, desc=self.desc, unit=self.unit, leave=False,
                            dynamic_ncols=True, mininterval=1.0)
            return
        start = last = time.perf_counter()
        stream = self.stream or sys.stdout
        for i, item in enumerate(self.iterable, 1):
            yield item
            now = time.perf_counter()
            if now - last >= PROGRESS_SECONDS and i < self.total:
                rate = i / (now - start)
                print(f"{self.desc}: {i}/{self.total} {self.unit} ({100 * i / self.total:.0f}%), "
                      f"eta {format_eta((self.total - i) / rate)}", file=stream, flush=True)
                last = now


class MetricsLogger:
    """Rank 0's sinks: stdout (tqdm bar / simple lines / JSON lines), metrics.jsonl, TensorBoard."""

    def __init__(self, save_dir: Path, log_format: str, tb_dir: Optional[Path], start_update: int,
                 max_update: int, enabled: bool = True, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        if log_format not in ("tqdm", "simple", "json"):
            from speechssl.config import ConfigError

            raise ConfigError(f"common.log_format: '{log_format}' is not tqdm, simple or json")
        if log_format == "tqdm" and not sys.stderr.isatty():
            log_format = "simple"  # a progress bar in a log file is noise (fairseq does the same)
        self.format = log_format
        self.path = save_dir / "metrics.jsonl"
        self.bar = self.tb = self.fh = None
        if not enabled:
            return
        truncate_metrics(self.path, start_update)
        self.fh = open(self.path, "a", encoding="utf-8")
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tb_dir), purge_step=start_update + 1 if start_update else None)
        if log_format == "tqdm":
            from tqdm import tqdm

            total = max_update or None
            self.bar = tqdm(total=total, initial=start_update, unit="upd", dynamic_ncols=True, leave=True)

    def progress(self, n_updates: int, rec: Optional[dict[str, Any]] = None) -> None:
        """Advance the bar by ``n_updates`` (tqdm format) and show ``rec``'s columns."""
        if self.bar is not None:
            self.bar.update(n_updates)
            if rec is not None:
                self.bar.set_postfix_str(format_record(rec).split(" | ", 1)[1], refresh=False)

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("update", "split"):
                    self.tb.add_scalar(f"{rec['split']}/{k}", v, rec.get("update", 0))
        self.message(json.dumps(rec) if self.format == "json" else format_record(rec))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        for sink in (self.bar, self.tb, self.fh):
            if sink is not None:
                sink.close()


def truncate_metrics(path: Path, last_update: int) -> None:
    """Drop records after ``last_update`` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keep = json.loads(line).get("update", 0) <= last_update
        except (json.JSONDecodeError, AttributeError):
            keep = False  # a line cut by a crash
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (skipping a line cut by a crash)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
