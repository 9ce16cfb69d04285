"""Checkpoints: atomic writes, fairseq file names, rotation, RNG state, and resume checks.

A checkpoint is a dict of tensors and plain Python data only, so ``torch.load(path, weights_only=True)``
reads it without running any code::

    model, optimizer, scaler         state dicts
    num_updates, epoch, batch_offset  where training stands (batches this rank consumed in ``epoch``)
    world_size, update_freq           the layout batch_offset refers to
    rng                               per-rank RNG states (python, numpy, torch, cuda), gathered to rank 0
    best                              best value of checkpoint.best_checkpoint_metric so far
    config                            Config.to_dict() of the run
    version                           checkpoint format version

Files in ``checkpoint.save_dir`` (fairseq's names): ``checkpoint_<epoch>_<update>.pt`` every
``save_interval_updates`` (the last ``keep_interval_updates`` kept), ``checkpoint<epoch>.pt`` at the end
of every ``save_interval`` epochs (unless ``no_epoch_checkpoints``; last ``keep_last_epochs`` kept),
``checkpoint_best.pt`` (best ``checkpoint.best_checkpoint_metric``, valid loss by default) and
``checkpoint_last.pt`` (newest). Each file is written to a temporary file, fsynced and renamed; the extra
names are copies (as fairseq's), also swapped in by rename, so a crash at any moment leaves every existing
checkpoint intact, and damage to one file (a disk error, a truncating copy) never reaches the others.

Resume (:func:`find_resume_checkpoint`) loads ``checkpoint_last.pt``; if it is damaged it falls back to the
newest intact checkpoint of the folder, with a notice, or stops with an error that names the file and
the ways out.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np
import torch

from speechssl.config import CheckpointConfig, Config, ConfigError, config_from_dict
from speechssl.utils.io import atomic_open

VERSION = 1
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
_UPDATE_RE = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")
_EPOCH_RE = re.compile(r"^checkpoint(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as weights_only-loadable data."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointError(RuntimeError):
    """A file that should be a speechssl checkpoint is not (damaged, foreign); the message says what it is."""


class _Writer(io.RawIOBase):
    """A binary file wrapper that keeps the OSError of a failed write (torch.save turns it into an opaque
    RuntimeError about zip positions)."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.error = fh, None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, rename (never a half-written ``path``).

    A failed write (disk full, quota) raises OSError naming ``path``; the previous ``path`` is untouched."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as fh:
            writer = _Writer(fh)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
    except OSError as exc:  # name the checkpoint, not its temporary file
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a speechssl checkpoint on the CPU with ``weights_only=True``.

    Anything else raises CheckpointError saying what the file is (missing, empty, truncated, a fairseq or
    transformers file, not a checkpoint) and, where ``speechssl import`` converts it, the command."""
    from speechssl.interop.identify import not_a_checkpoint_message

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(not_a_checkpoint_message(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception:  # torch raises several types; its advice (weights_only=False) would be unsafe
        raise CheckpointError(not_a_checkpoint_message(path)) from None
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("config"), dict):
        raise CheckpointError(not_a_checkpoint_message(path))  # e.g. a transformers pytorch_model.bin
    return state


def _copy_atomically(src: Path, dst: Path) -> None:
    """Make ``dst`` an independent copy of ``src`` (temporary file, fsync, rename)."""
    with atomic_open(dst, "wb") as out, open(src, "rb") as fh:
        shutil.copyfileobj(fh, out, length=16 << 20)


TRAINING_KEYS = ("model", "optimizer", "num_updates", "epoch", "batch_offset", "config")


def load_training_state(path: Path) -> dict[str, Any]:
    """A checkpoint that training can resume from (CheckpointError otherwise)."""
    state = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} holds no training state (no {', '.join(missing)}): not written by a "
                              "training run")
    return state


def resume_candidates(save_dir: Path) -> list[Path]:
    """The checkpoints of ``save_dir`` other than checkpoint_last.pt, newest first (by write time)."""
    found = [p for p in save_dir.glob("checkpoint*.pt") if p.name != LAST and p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def find_resume_checkpoint(save_dir: Path) -> tuple[Optional[Path], Optional[dict[str, Any]], list[str]]:
    """``(path, state, notices)`` of the checkpoint to resume from (``(None, None, [])``: start fresh).

    ``checkpoint_last.pt`` if it loads; if it is damaged, the newest intact checkpoint of ``save_dir``
    with a notice; CheckpointError naming the file and the options if none is intact."""
    last = save_dir / LAST
    if not last.exists():
        return None, None, []
    try:
        return last, load_training_state(last), []
    except CheckpointError as exc:
        damage = str(exc)
    tried = []
    for cand in resume_candidates(save_dir):
        try:
            state = load_training_state(cand)
        except CheckpointError:
            tried.append(cand.name)
            continue
        return cand, state, [f"warning: {damage}", f"warning: resuming from {cand.name} (update "
                             f"{state['num_updates']}), the newest intact checkpoint in {save_dir}; the next save "
                             f"replaces {LAST}"]
    others = f" (also damaged: {', '.join(tried)})" if tried else " and no other checkpoint"
    raise CheckpointError(
        f"cannot resume: {damage}{others}. Options: restore {last} from a backup; start over with --restart --force "
        "(deletes this run's files); or choose another checkpoint.save_dir")


def config_differences(a: dict[str, Any], b: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """Dotted keys of ``sections`` whose values differ between two Config.to_dict() dicts."""
    out = []
    for sec in sections:
        sa, sb = a.get(sec, {}), b.get(sec, {})
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                out.append(f"{sec}.{key}: checkpoint {sb.get(key)!r}, now {sa.get(key)!r}")
    return out


def check_resume_config(cfg: Config, ckpt: dict[str, Any], path: Path, sections: tuple[str, ...]) -> list[str]:
    """Raise ConfigError if ``sections`` (e.g. ``model``) differ from the checkpoint's; return the other
    sections' differences (informational: e.g. a raised max_update)."""
    try:
        saved = config_from_dict(ckpt["config"], source=str(path)).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"{path}: its stored config does not load with this speechssl version ({exc})") from None
    now = cfg.to_dict()
    fatal = config_differences(now, saved, sections)
    if fatal:
        raise ConfigError(
            f"cannot resume from {path}: the model settings differ from the checkpoint's:\n  " + "\n  ".join(fatal)
            + "\nuse the checkpoint's settings, or start a new run (another checkpoint.save_dir, or --restart --force)")
    others = tuple(s for s in now if s not in sections)
    return config_differences(now, saved, others)


class CheckpointManager:
    """Writes checkpoints into ``save_dir`` with fairseq's names and prunes old ones (rank 0 only)."""

    def __init__(self, cfg: CheckpointConfig, save_dir: Optional[Path] = None):
        self.cfg = cfg
        self.dir = Path(save_dir or cfg.save_dir)
        self.resume_point: Optional[tuple[int, Path]] = None  # (update, file) a new run would resume from

    @property
    def last(self) -> Path:
        return self.dir / LAST

    def save(self, state: dict[str, Any], epoch: int, num_updates: int, end_of_epoch: bool,
             is_best: bool) -> Path:
        """Write ``state`` under its interval name (or only as last/best), then link last/best to it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        names = []
        if end_of_epoch and not self.cfg.no_epoch_checkpoints and epoch % max(1, self.cfg.save_interval) == 0:
            names.append(f"checkpoint{epoch}.pt")
        if not end_of_epoch and self.cfg.save_interval_updates > 0 \
                and num_updates % self.cfg.save_interval_updates == 0:
            names.append(f"checkpoint_{epoch}_{num_updates}.pt")
        primary = self.dir / (names[0] if names else LAST)
        save_checkpoint(state, primary)
        for extra in names[1:] + ([LAST] if names else []):
            _copy_atomically(primary, self.dir / extra)
        self.resume_point = (num_updates, self.last)
        if is_best:
            _copy_atomically(primary, self.dir / BEST)
        self._prune()
        return primary

    def _prune(self) -> None:
        def numbered(pattern: re.Pattern, key: int) -> list[Path]:
            found = [(int(m.group(key)), p) for p in self.dir.iterdir() if (m := pattern.match(p.name))]
            return [p for _, p in sorted(found, reverse=True)]

        for keep, files in ((self.cfg.keep_interval_updates, numbered(_UPDATE_RE, 2)),
                            (self.cfg.keep_last_epochs, numbered(_EPOCH_RE, 1))):
            if keep > 0:  # fairseq: 0 and -1 keep all
                for old in files[keep:]:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
