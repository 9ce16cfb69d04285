"""Transcripts and speakers of scanned audio files, and fairseq dictionaries, for ``speechssl manifest``.

Transcripts are looked up for an audio file ``a/b/utt.flac`` in this order:

1. a sidecar ``a/b/utt.txt`` or ``a/b/utt.lab`` (all its lines, joined by spaces);
2. a LibriSpeech ``*.trans.txt`` in ``a/b/``, then in ``a/``, then in the root, holding a line
   ``utt TEXT`` (the utterance id is the file stem).

Speakers: ``--speaker-regex`` (one group, searched in the relative path), else the LibriSpeech layout
``speaker/chapter/utt.flac`` (the first component of paths exactly three components long).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Iterable

from speechssl.data.manifest_scan import Discovery


class Transcripts:
    """Transcript lookup for the files of one :class:`Discovery`. Unreadable transcript files are
    recorded in ``warnings`` and count as missing."""

    def __init__(self, found: Discovery):
        self.root = found.root
        self.sidecars = found.sidecars
        self.warnings: list[str] = []
        self.by_dir: dict[str, dict[str, str]] = {}  # "a/b" -> {utt id: text}
        for rel in found.transcript_files:
            table = self.by_dir.setdefault(os.path.dirname(rel), {})
            try:
                with open(os.path.join(self.root, rel), encoding="utf-8") as fh:
                    for line in fh:
                        utt, _, text = line.strip().partition(" ")
                        if utt:
                            table[utt] = text
            except (OSError, UnicodeDecodeError) as exc:
                self.warnings.append(f"cannot read transcript file {rel}: {exc}")

    @property
    def any(self) -> bool:
        return bool(self.by_dir or self.sidecars)

    def get(self, rel: str) -> str | None:
        """The raw (not yet normalized) transcript of audio file ``rel``, or None."""
        stem_path = rel.rpartition(".")[0]
        sidecar = self.sidecars.get(stem_path)
        if sidecar is not None:
            try:
                with open(os.path.join(self.root, sidecar), encoding="utf-8") as fh:
                    return " ".join(fh.read().split())
            except (OSError, UnicodeDecodeError) as exc:
                self.warnings.append(f"cannot read transcript file {sidecar}: {exc}")
                return None
        utt = os.path.basename(stem_path)
        directory = os.path.dirname(rel)
        while True:
            table = self.by_dir.get(directory)
            if table is not None and utt in table:
                return table[utt]
            if not directory:
                return None
            directory = os.path.dirname(directory)


def compile_speaker_regex(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--speaker-regex {pattern!r} is not a valid regular expression: {exc}") from None
    if regex.groups != 1:
        raise ValueError(f"--speaker-regex {pattern!r} must have exactly one (group), it has {regex.groups}")
    return regex


def speaker_of(rel: str, regex: re.Pattern | None) -> str | None:
    """The speaker of relative path ``rel`` (see the module docstring), or None."""
    if regex is not None:
        m = regex.search(rel)
        return m.group(1) if m and m.group(1) else None
    parts = rel.split("/")
    return parts[0] if len(parts) == 3 else None


def count_dictionary(lines: Iterable[str]) -> list[tuple[str, int]]:
    """fairseq dictionary entries from label lines: every space-separated symbol with its count,
    sorted by count (descending), then symbol."""
    counts = Counter(sym for line in lines for sym in line.split())
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
