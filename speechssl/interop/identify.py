"""Tell what a file is when a speechssl checkpoint was expected, and how to convert it.

``model.w2v_path``, ``evaluate``, ``export``, ``extract`` and resume read speechssl checkpoints with
``torch.load(weights_only=True)``. When that fails, or the file loads but is not a speechssl
checkpoint, :func:`not_a_checkpoint_message` says what the file is, from its bytes only (nothing is
unpickled: the pickle's opcodes are scanned for the class names and dictionary keys it holds):

    empty / truncated or damaged / a fairseq checkpoint (pretraining or CTC) / a transformers weights file
    or folder / a torchaudio export / a fairseq2 checkpoint or asset card / a text file / not a checkpoint

and, where ``speechssl import`` reads it, the exact command that converts it.
"""

from __future__ import annotations

import io
import pickletools
import shlex
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

SCAN_LIMIT = 64 << 20  # bytes of pickle scanned (the pickle part of a checkpoint is small; tensors are apart)


@dataclass
class Identity:
    kind: str  # empty | truncated | speechssl | fairseq | hf | torchaudio | fairseq2 | text | folder | torch | random
    what: str  # a phrase: "a fairseq checkpoint (CTC fine-tuned)"
    source: Optional[Path] = None  # what 'speechssl import' takes (a folder for hf/torchaudio)
    ctc: bool = False


def _pickle_names(data: bytes) -> tuple[set[str], set[str]]:
    """(globals ``module.name``, short strings) named by a pickle, without unpickling it."""
    globals_, strings = set(), set()
    recent: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                globals_.add(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(recent) >= 2:
                globals_.add(f"{recent[-2]}.{recent[-1]}")
            elif isinstance(arg, str):
                recent = (recent + [arg])[-2:]
                if len(arg) < 200:
                    strings.add(arg)
            if op.name == "STOP":
                break
    except Exception:  # a cut pickle: what was read so far still tells a lot
        pass
    return globals_, strings


def _torch_pickle(path: Path) -> Optional[tuple[set[str], set[str]]]:
    """Names in the pickle of a torch zip checkpoint; None if the archive is incomplete."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not names:
                return set(), set()
            with zf.open(names[0]) as fh:
                return _pickle_names(fh.read(SCAN_LIMIT))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def _any(strings: Iterable[str], *prefixes: str) -> bool:
    return any(s.startswith(prefixes) for s in strings)


def _from_names(globals_: set[str], strings: set[str], path: Path) -> Identity:
    if any(g.startswith(("fairseq.", "omegaconf.", "argparse.")) for g in globals_) or \
            ("cfg" in strings and "optimizer_history" in strings) or ("args" in strings and "model" in strings
                                                                       and "optimizer_history" in strings):
        ctc = _any(strings, "w2v_encoder.") or bool({"wav2vec_ctc", "hubert_ctc"} & strings)
        return Identity("fairseq", f"a fairseq checkpoint ({'CTC fine-tuned' if ctc else 'pretraining'})", path, ctc)
    if {"model", "config"} <= strings and ("num_updates" in strings or "version" in strings):
        return Identity("speechssl", "a speechssl checkpoint")
    if _any(strings, "wav2vec2.", "hubert.", "data2vec_audio.", "lm_head.") or \
            (_any(strings, "encoder.layers.0.attention.") and _any(strings, "feature_projection.projection.")):
        return Identity("hf", "a transformers weights file (pytorch_model.bin)", path.parent)
    if _any(strings, "encoder.transformer.layers.", "encoder.feature_projection."):
        return Identity("torchaudio", "a torchaudio wav2vec2 state dict", path.parent)
    if _any(strings, "encoder_frontend.", "model.encoder_frontend."):
        return Identity("fairseq2", "a fairseq2 checkpoint (import its asset card .yaml)", path.parent)
    keys = sorted(s for s in strings if s.isidentifier())[:6]
    return Identity("torch", "a torch file of some other kind" + (f" (it names {', '.join(keys)})" if keys else ""))


def identify(path: str | Path) -> Identity:
    """What ``path`` is, judged from its bytes (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file() and any((path / n).is_file() for n in ("model.safetensors",
                                                                                    "pytorch_model.bin")):
            return Identity("hf", "a transformers model folder", path)
        if (path / "config.json").is_file() and (path / "model.pt").is_file():
            return Identity("torchaudio", "a torchaudio export folder", path)
        if list(path.glob("*.yaml")):
            return Identity("fairseq2", "a folder with a fairseq2 asset card", path)
        return Identity("folder", "a folder")
    size = path.stat().st_size
    if size == 0:
        return Identity("empty", "an empty file (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(min(size, SCAN_LIMIT))
    if head.startswith(b"PK\x03\x04"):
        names = _torch_pickle(path)
        if names is None:
            return Identity("truncated", f"truncated or damaged ({size} bytes; the end of its zip archive is missing)")
        return _from_names(*names, path)
    if head[:1] == b"\x80":  # a pickle: torch's legacy format, or plain pickle
        globals_, strings = _pickle_names(_skip_legacy_headers(head))
        if not globals_ and not strings:
            return Identity("truncated", f"a pickle that is cut short or damaged ({size} bytes)")
        return _from_names(globals_, strings, path)
    if len(head) > 8 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < size:
        return Identity("hf", "a safetensors weights file (transformers' model.safetensors)", path.parent)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return Identity("random", "a file of unknown format (neither a torch zip archive nor a pickle)")
    if "model_family" in text and "wav2vec2" in text:
        return Identity("fairseq2", "a fairseq2 asset card", path)
    return Identity("text", "a text file")


def _skip_legacy_headers(data: bytes) -> bytes:
    """torch's legacy format is several pickles (magic number, protocol, sys info, object): the object's."""
    stream = io.BytesIO(data)
    for _ in range(3):
        start = stream.tell()
        try:
            for op, _, _ in pickletools.genops(stream):
                if op.name == "STOP":
                    break
        except Exception:
            stream.seek(start)
            break
    return data[stream.tell():] or data


def import_command(ident: Identity, path: Path) -> Optional[str]:
    """The ``speechssl import`` command that converts what :func:`identify` found (None if none does)."""
    fmt = {"fairseq": "fairseq", "hf": "hf", "torchaudio": "torchaudio", "fairseq2": "fairseq2"}.get(ident.kind)
    if fmt is None or ident.source is None:
        return None
    src = ident.source
    out = src.parent / f"{src.stem or src.name}.speechssl.pt"
    cmd = f"speechssl import {shlex.quote(str(src))} --from {fmt} --out {shlex.quote(str(out))}"
    return cmd + (" --dict dict.ltr.txt" if ident.ctc else "")


def not_a_checkpoint_message(path: str | Path, what_for: str = "a speechssl checkpoint") -> str:
    """One message: what ``path`` is instead of ``what_for``, and the command that converts it if any."""
    path = Path(path)
    try:
        ident = identify(path)
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror or exc})"
    if ident.kind == "speechssl":  # its pickle reads, yet torch.load failed: the tensor data are damaged
        return (f"{path} is a speechssl checkpoint whose data do not load (damaged); use another checkpoint of "
                "the run (checkpoint_best.pt, checkpoint_<epoch>_<update>.pt) or copy it again")
    msg = f"{path} is {ident.what}, not {what_for}"
    cmd = import_command(ident, path)
    if cmd:
        dict_note = " (--dict: the dict.ltr.txt it was fine-tuned with)" if ident.ctc else ""
        return f"{msg}; convert it first: {cmd}{dict_note}, then use the .speechssl.pt file"
    if ident.kind in ("empty", "truncated"):
        return f"{msg}; it was probably cut short while copying or writing: copy it again or use another checkpoint"
    if ident.kind == "torch":
        return (f"{msg}; another toolkit's checkpoint is converted first with 'speechssl import "
                f"{shlex.quote(str(path))} --from fairseq|hf|torchaudio|fairseq2 --out OUT.pt'")
    return f"{msg} (speechssl checkpoints are written by 'speechssl pretrain', 'finetune' and 'import')"


def import_source_problem(src: str | Path, fmt: str) -> Optional[str]:
    """Why ``speechssl import SRC --from FMT`` cannot work, judged before reading SRC (None: try it)."""
    src = Path(src)
    if not src.exists():
        return f"{src}: not found"
    try:
        ident = identify(src)
    except OSError as exc:
        return f"{src}: cannot read it ({exc.strerror or exc})"
    expected = {"fairseq": "a fairseq checkpoint (.pt)", "fairseq2": "a fairseq2 asset card (.yaml) or its folder",
                "hf": "a transformers model folder", "torchaudio": "a folder written by 'speechssl export --to "
                "torchaudio'"}[fmt]
    readable = {"fairseq": ("fairseq", "torch"), "fairseq2": ("fairseq2", "text")}.get(fmt, ())
    if src.is_dir() and fmt != "fairseq" or not src.is_dir() and ident.kind in readable:
        return None  # the importer reads it and says what is wrong with it, if anything
    if ident.kind == "speechssl":
        return f"{src} is a speechssl checkpoint already: use it as it is, no import needed"
    cmd = import_command(ident, src)
    if cmd:
        return f"{src} is {ident.what}, not {expected}; import it with: {cmd}"
    return f"{src} is {ident.what}, not {expected}"
