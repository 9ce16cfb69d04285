"""CTC output vocabulary in fairseq's dictionary order: ``<s> <pad> </s> <unk>`` then the symbols.

Index 0 (``<s>``) is the CTC blank, as in fairseq's ``Wav2VecCtc`` (``blank_idx = bos``); ``<pad>`` pads
target batches. Two kinds of symbols:

* ``letter``: the characters of ``dict.ltr.txt`` (``| E T A ...``, ``|`` = word boundary); targets are
  the ``.ltr`` lines (``H I | Y O U |``); text = symbols joined, ``|`` -> space.
* ``sentencepiece``: the pieces of a sentencepiece model (``speechssl spm train``); targets are the
  ``.wrd`` lines encoded with the model; text = pieces joined, ``▁`` -> space.

Only the symbol list is needed to decode, and it is stored in a fine-tuned checkpoint
(``config["task"]["vocab"]``); the sentencepiece model file is needed only to encode training targets.

A vocabulary imported from a transformers CTC model keeps that tokenizer's token strings and specials
(``task.vocab_specials``: its pad = blank, unk, bos and eos tokens, e.g. ``[PAD] [UNK] <s> </s>`` of
transformers' fine-tuning tutorial): the blank is still index 0, the specials are whatever symbols the
tokenizer names, and decoding drops them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from speechssl.data.text import WORD_BOUNDARY

BLANK, PAD, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
SPM_SPACE = "\u2581"  # sentencepiece's word-start marker
KINDS = {"ltr": "letter", "wrd": "sentencepiece"}


class VocabError(ValueError):
    """A dictionary or sentencepiece model is unusable; the message names the file."""


def read_dict_file(path: str | Path) -> list[str]:
    """Symbols of a fairseq ``dict.*.txt`` (``symbol count`` per line) in file order."""
    path = Path(path)
    if not path.is_file():
        raise VocabError(f"dictionary not found: {path} (written by 'speechssl manifest' for labeled audio)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VocabError(f"{path}: not UTF-8 text (a dictionary: 'symbol count' per line)") from None
    symbols = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise VocabError(f"{path}:{lineno}: expected 'symbol count', got {line!r}")
        if parts[0] not in SPECIALS:
            symbols.append(parts[0])
    if not symbols:
        raise VocabError(f"{path}: empty dictionary")
    return symbols


class Vocabulary:
    """Symbols (blank first) and the conversions target line -> ids -> text.

    Args:
        symbols: the full list (as stored in ``task.vocab``): ``SPECIALS`` first, or with ``specials`` the
            blank first.
        kind: ``letter`` or ``sentencepiece``.
        spm_model: sentencepiece model file, needed by :meth:`encode` for the sentencepiece kind.
        specials: a transformers tokenizer's ``[pad, unk, bos, eos]`` tokens (``task.vocab_specials``), pad
            being the blank ``symbols[0]``; empty for fairseq's layout.
    """

    def __init__(self, symbols: Sequence[str], kind: str, spm_model: Optional[str | Path] = None,
                 specials: Sequence[str] = ()):
        if specials:
            if len(specials) != 4 or not symbols or symbols[0] != specials[0]:
                raise VocabError(f"task.vocab_specials must be a tokenizer's [pad, unk, bos, eos] with the pad token "
                                 f"(the CTC blank) first in task.vocab; got {list(specials)}, "
                                 f"task.vocab starting {list(symbols[:1])}")
        elif tuple(symbols[: len(SPECIALS)]) != SPECIALS:
            raise VocabError(f"vocabulary must start with {', '.join(SPECIALS)}, got {list(symbols[:4])}")
        if kind not in KINDS.values():
            raise VocabError(f"unknown vocabulary kind '{kind}'; use {' or '.join(KINDS.values())}")
        self.symbols = list(symbols)
        self.kind = kind
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.spm_model = spm_model
        self.specials = list(specials) or list(SPECIALS)  # non-text symbols: never part of a transcript
        self.unk = self.index.get(self.specials[1] if specials else SPECIALS[UNK])
        self._text = [s not in self.specials for s in self.symbols]
        self._sp = None

    def __len__(self) -> int:
        return len(self.symbols)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict_file(cls, path: str | Path) -> "Vocabulary":
        """Letters from ``dict.ltr.txt``."""
        return cls(list(SPECIALS) + read_dict_file(path), "letter")

    @classmethod
    def from_spm(cls, model_path: str | Path) -> "Vocabulary":
        """Pieces of a sentencepiece model (its own control/unknown pieces left out)."""
        sp = load_spm(model_path)
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                  if not (sp.is_control(i) or sp.is_unknown(i))]
        return cls(list(SPECIALS) + pieces, "sentencepiece", model_path)

    @classmethod
    def for_labels(cls, label: str, symbols: Sequence[str], spm_model: Optional[str] = None,
                   specials: Sequence[str] = ()) -> "Vocabulary":
        """The vocabulary of label extension ``label`` (``ltr`` or ``wrd``) with stored ``symbols``."""
        if label not in KINDS:
            raise VocabError(f"task.labels=[{label}]: CTC fine-tuning reads ltr (letters) or wrd (sentencepiece)")
        return cls(symbols, KINDS[label], spm_model, specials)

    @classmethod
    def for_task(cls, task) -> "Vocabulary":
        """The vocabulary stored in a CTC checkpoint's task section (``vocab``, ``vocab_specials``)."""
        return cls.for_labels(task.labels[0], task.vocab, task.spm_model, task.vocab_specials)

    # -- conversions --------------------------------------------------------------------------------
    def encode(self, line: str) -> list[int]:
        """One label line (``.ltr`` letters, or ``.wrd`` words for sentencepiece) -> symbol ids
        (unknown symbols -> ``<unk>``)."""
        if self.kind == "letter":
            units = line.split()
        else:
            if self._sp is None:
                if self.spm_model is None:
                    raise VocabError("encoding words needs the sentencepiece model: set task.spm_model")
                self._sp = load_spm(self.spm_model)
            units = self._sp.encode(line.strip(), out_type=str)
        if self.unk is None and any(u not in self.index for u in units):
            raise VocabError(f"symbols {sorted({u for u in units if u not in self.index})} are not in the vocabulary, "
                             "which has no unknown token")
        return [self.index.get(u, self.unk) for u in units]

    def unknown_symbols(self, line: str) -> list[str]:
        """Symbols of a ``.ltr`` line that are not in the vocabulary."""
        return [u for u in line.split() if u not in self.index] if self.kind == "letter" else []

    def decode(self, ids: Sequence[int]) -> str:
        """Symbol ids (already CTC-collapsed) -> text of space-separated words (specials dropped)."""
        units = [self.symbols[i] for i in ids if self._text[i]]
        text = "".join(units)
        text = text.replace(WORD_BOUNDARY if self.kind == "letter" else SPM_SPACE, " ")
        return " ".join(text.split())

    def word_boundary(self) -> str:
        return WORD_BOUNDARY if self.kind == "letter" else SPM_SPACE


def load_spm(path: str | Path):
    """A ``sentencepiece.SentencePieceProcessor`` for ``path`` (error naming the file)."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise VocabError(f"sentencepiece model not found: {path} (make one with 'speechssl spm train')")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:
        raise VocabError(f"{path}: not a sentencepiece model ({exc})") from None
