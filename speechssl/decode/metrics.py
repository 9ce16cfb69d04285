"""Word and character error rates (jiwer), overall and per utterance.

``wer = (substitutions + deletions + insertions) / reference words``; CER the same over characters
(spaces included, as jiwer). Both are reported in percent by :func:`score`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jiwer


@dataclass
class ErrorCounts:
    """Edit operations of one or more utterances against their references."""

    errors: int = 0
    total: int = 0  # reference units (words or characters)

    def __iadd__(self, other: "ErrorCounts") -> "ErrorCounts":
        self.errors += other.errors
        self.total += other.total
        return self

    @property
    def rate(self) -> float:
        """Error rate in percent (0 when there is no reference unit and no error, else inf if total 0)."""
        if self.total == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return 100.0 * self.errors / self.total


def _per_utterance(output) -> list[ErrorCounts]:
    counts = []
    for chunks in output.alignments:
        errors = total = 0
        for c in chunks:
            ref_n, hyp_n = c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx
            total += ref_n
            if c.type == "substitute" or c.type == "delete":
                errors += ref_n
            elif c.type == "insert":
                errors += hyp_n
        counts.append(ErrorCounts(errors, total))
    return counts


def utterance_errors(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[ErrorCounts], list[ErrorCounts]]:
    """Per-utterance ``(word_counts, char_counts)`` of ``hyps`` against ``refs`` (same length)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return [], []
    words = _per_utterance(jiwer.process_words(list(refs), list(hyps)))
    chars = _per_utterance(jiwer.process_characters(list(refs), list(hyps)))
    return words, chars


def score(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """``{"wer": %, "cer": %, "word_errors", "words", "char_errors", "chars", "num_utterances"}``."""
    words, chars = utterance_errors(refs, hyps)
    w, c = ErrorCounts(), ErrorCounts()
    for x in words:
        w += x
    for x in chars:
        c += x
    return {"wer": w.rate, "cer": c.rate, "word_errors": w.errors, "words": w.total,
            "char_errors": c.errors, "chars": c.total, "num_utterances": len(words)}
