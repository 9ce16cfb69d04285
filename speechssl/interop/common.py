"""What every import/export direction shares: reading a speechssl checkpoint into a model, writing an
imported one, and writing an export folder atomically.

An imported checkpoint is an ordinary speechssl checkpoint (``weights_only``-loadable)::

    model        state dict in speechssl names
    config       Config.to_dict(): model section (architecture, fairseq names) and task section
                 (sample_rate, normalize; for CTC models name=audio_finetuning and the vocabulary)
    num_updates  0 (or the source's update count when it has one)
    version      speechssl checkpoint format version
    imported_from  {"format": ..., "path": ...}

so ``speechssl finetune ... model.w2v_path=IMPORTED.pt``, ``speechssl evaluate``, ``speechssl features
layer`` and ``speechssl export`` take it like a checkpoint that speechssl wrote itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from torch import Tensor, nn

from speechssl.config import Config, ConfigError, ModelConfig, TaskConfig, config_from_dict
from speechssl.utils.io import chmod_as_created


class InteropError(ValueError):
    """Input that cannot be converted; the message names the file or key and what to do."""


@dataclass
class Loaded:
    """A speechssl checkpoint in memory: ``model`` (eval mode; a Wav2VecCtc for CTC checkpoints),
    ``upstream`` (the Wav2Vec2Model / HubertModel inside), ``cfg`` and ``vocab`` (CTC: output symbols)."""

    model: nn.Module
    upstream: nn.Module
    cfg: Config
    is_ctc: bool
    num_updates: int

    @property
    def vocab(self) -> list[str]:
        return list(self.cfg.task.vocab)


def load_speechssl(path: str | Path) -> Loaded:
    """Any speechssl checkpoint (pretraining, CTC fine-tuning, imported) -> :class:`Loaded` (CPU, eval)."""
    from speechssl.models import build_model
    from speechssl.train.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path}: no such checkpoint file")
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:  # says what the file is instead, and how to convert it
        raise InteropError(str(exc)) from None
    try:
        cfg = config_from_dict(state["config"], source=str(path))
    except ConfigError as exc:
        raise InteropError(f"{path}: its stored config does not load with this speechssl version ({exc})") from None
    num_updates = int(state.get("num_updates", 0) or 0)
    if cfg.task.name == "audio_finetuning":
        from speechssl.models.ctc import load_ctc_checkpoint

        model, cfg = load_ctc_checkpoint(str(path))
        return Loaded(model.eval(), model.w2v_model, cfg, True, num_updates)
    if cfg.task.name not in ("audio_pretraining", "hubert_pretraining"):
        raise InteropError(f"{path}: task.name={cfg.task.name} checkpoints cannot be exported (only pretraining "
                           "and CTC fine-tuning models)")
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return Loaded(model.eval(), model, cfg, False, num_updates)


def imported_config(model_cfg: ModelConfig, *, sample_rate: int = 16000, normalize: bool = False,
                    vocab: Optional[list[str]] = None, label_rate: float = -1.0,
                    vocab_specials: Sequence[str] = (), vocab_blank_id: int = 0) -> Config:
    """The Config stored with an imported model: its architecture plus the task facts it needs
    (``vocab_specials`` / ``vocab_blank_id``: a CTC vocabulary in a transformers tokenizer's layout)."""
    if vocab:
        pieces = any(s.startswith("\u2581") for s in vocab)  # sentencepiece word-start marker
        task = TaskConfig(name="audio_finetuning", labels=["wrd" if pieces else "ltr"], sample_rate=sample_rate,
                          normalize=normalize, vocab=list(vocab), vocab_specials=list(vocab_specials),
                          vocab_blank_id=int(vocab_blank_id))
    elif model_cfg.name == "hubert":
        task = TaskConfig(name="hubert_pretraining", labels=["km"], sample_rate=sample_rate, normalize=normalize,
                          label_rate=label_rate)
    else:
        task = TaskConfig(name="audio_pretraining", sample_rate=sample_rate, normalize=normalize)
    return Config(model=model_cfg, task=task)


def check_and_build(state_dict: Mapping[str, Tensor], cfg: Config, source: str) -> nn.Module:
    """Build the model ``cfg`` describes and load ``state_dict`` strictly (fails loudly on a bad mapping)."""
    from speechssl.models import build_model

    if cfg.task.name == "audio_finetuning":
        from speechssl.models.ctc import build_ctc_model

        model = build_ctc_model(cfg.model, len(cfg.task.vocab), load_upstream=False)
    else:
        model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        raise InteropError(f"{source}: converted weights do not fit the model its config describes: "
                           f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                           f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    return model.eval()


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise InteropError(f"{path} exists; pass --force to replace it")


def save_imported(path: str | Path, state_dict: Mapping[str, Tensor], cfg: Config, source_format: str,
                  source_path: str | Path, force: bool = False, num_updates: int = 0) -> Path:
    """Write an imported model as a speechssl checkpoint (atomic; refuses to overwrite without ``force``)."""
    from speechssl.train.checkpoint import VERSION, save_checkpoint

    path = Path(path)
    refuse_existing(path, force)
    state = {
        "model": {k: v.detach().contiguous().clone() for k, v in state_dict.items()},
        "config": cfg.to_dict(),
        "num_updates": int(num_updates),
        "version": VERSION,
        "imported_from": {"format": source_format, "path": str(Path(source_path).resolve())},
    }
    save_checkpoint(state, path)
    return path


# Every name ``speechssl export`` writes, in any format (fairseq2 adds <folder name>.yaml, its asset card).
EXPORT_FILES = frozenset({"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json",
                          "special_tokens_map.json", "preprocessor_config.json", "model.pt", "model.onnx",
                          "model.onnx.data"})


def card_name(out: str | Path) -> str:
    """The fairseq2 asset card name of an export folder: its name with other characters as ``_``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", Path(out).name)


def foreign_entries(out: Path) -> list[str]:
    """Entries of an existing export folder that ``speechssl export`` did not write (subfolders included)."""
    own = EXPORT_FILES | {f"{card_name(out)}.yaml"}
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in own or p.is_dir())


@contextlib.contextmanager
def export_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on clean exit it replaces ``out`` (which must not exist
    unless ``force``). On an error the temporary folder is removed and ``out`` is untouched.

    ``force`` replaces only an earlier export: a folder holding anything export does not write
    (:data:`EXPORT_FILES`) is refused, so a mistyped ``--out`` never deletes the user's files. The folder
    gets the permissions mkdir would give it (the umask applies)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InteropError(f"--out {out} is a file; give a folder to write the export into")
    refuse_existing(out, force)
    if out.exists():
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:6]) + (" ..." if len(foreign) > 6 else "")
            raise InteropError(f"--out {out} holds files that speechssl export did not write ({shown}); --force "
                               "replaces only an earlier export: choose another --out, or move those files away")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise InteropError(f"--out {out}: cannot create it ({exc.strerror or exc}); choose a folder you can write "
                           "to") from None
    chmod_as_created(tmp)
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


