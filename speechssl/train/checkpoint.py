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
names are hard links (copies where links fail), also swapped in by rename, so a crash at any moment
leaves every existing checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

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


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, rename (never a half-written ``path``)."""
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``; the error names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot load checkpoint {path}: {exc}") from None


def _link_atomically(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same content as ``src`` (hard link, else copy), swapped in by rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
        for extra in names[1:] + ([LAST] if names else []) + ([BEST] if is_best else []):
            _link_atomically(primary, self.dir / extra)
        self._prune()
        return primary

    def _prune(self) -> None:
        def numbered(pattern: re.Pattern, key: int) -> list[Path]:
            found = [(int(m.group(key)), p) for p in self.dir.iterdir() if (m := pattern.match(p.name))]
            return [p for _, p in sorted(found, reverse=True)]

        for keep, files in ((self.cfg.keep_interval_updates, numbered(_UPDATE_RE, 2)),
                            (self.cfg.keep_last_epochs, numbered(_EPOCH_RE, 1))):
            if keep >= 0:
                for old in files[keep:]:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
