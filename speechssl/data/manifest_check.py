"""``speechssl manifest --check DIR``: validate a manifest folder before training on it.

Checks, for every ``<split>.tsv`` in DIR (skipped.tsv excepted):

* the first line is an existing folder; every other line is ``relative/path<TAB>num_samples``;
* every file exists and is usable audio (the same probe as the scan: readable, not truncated, no NaN),
  mono, and soundfile's frame count equals the TSV's;
* all files of all splits share one sample rate;
* every label file ``<split>.<ext>`` has one non-empty line per TSV entry;
* every ``dict.*.txt`` is non-empty and made of ``symbol count`` lines; every symbol of the
  ``.ltr`` files is in ``dict.ltr.txt``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    file: str  # the manifest file (or audio file) at fault
    line: int | None  # 1-based line number in ``file``, when there is one
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


@dataclass
class CheckStats:
    splits: dict[str, tuple[int, float]]  # split -> (entries, seconds)
    labels: dict[str, list[str]]  # split -> label extensions
    sample_rates: Counter


def check_manifest(
    manifest_dir: str | os.PathLike, workers: int | None = None, quiet: bool = True, with_stats: bool = False
):
    """Return the list of :class:`Problem` found in ``manifest_dir`` (empty: the manifest is good);
    with ``with_stats`` a tuple (problems, :class:`CheckStats`)."""
    from speechssl.data.manifest_scan import probe_files

    d = Path(manifest_dir)
    problems: list[Problem] = []
    stats = CheckStats({}, {}, Counter())
    tsvs = sorted(p for p in d.glob("*.tsv") if p.name != "skipped.tsv") if d.is_dir() else []
    if not tsvs:
        problems.append(Problem(str(d), None, "no <split>.tsv manifest found"))
        return (problems, stats) if with_stats else problems
    rates_of: dict[str, list[tuple[str, int, int]]] = {}  # rate -> (tsv, line, path)
    entries: dict[str, int] = {}
    for tsv in tsvs:
        root, rows = _read_tsv(tsv, problems)
        split = tsv.name[:-4]
        entries[split] = len(rows)
        if root is None:
            continue
        probes = probe_files(root, [r[1] for r in rows], workers, quiet=quiet, desc=f"checking {split}")
        seconds = 0.0
        for (line, rel, count), p in zip(rows, probes):
            where = f"{tsv}"
            if p.problem:
                problems.append(Problem(where, line, f"{rel}: {p.detail}"))
                continue
            if p.frames != count:
                problems.append(Problem(where, line, f"{rel}: the TSV says {count} samples, soundfile reads {p.frames}"))
            if p.channels != 1:
                problems.append(Problem(where, line, f"{rel}: {p.channels} channels, expected mono"))
            rates_of.setdefault(p.sample_rate, []).append((where, line, rel))
            seconds += p.frames / p.sample_rate
        stats.splits[split] = (len(rows), seconds)
    stats.sample_rates = Counter({rate: len(v) for rate, v in rates_of.items()})
    if len(rates_of) > 1:
        common = stats.sample_rates.most_common(1)[0][0]
        mix = ", ".join(f"{rate} Hz: {n} files" for rate, n in stats.sample_rates.most_common())
        for rate, items in sorted(rates_of.items()):
            if rate != common:
                problems.extend(Problem(w, ln, f"{rel}: sample rate {rate} (mixed rates: {mix})") for w, ln, rel in items)
    _check_labels(d, entries, problems, stats)
    _check_dicts(d, problems)
    return (problems, stats) if with_stats else problems


def _read_text(path: Path, problems: list[Problem]) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), None, f"cannot read it as UTF-8 text: {exc}"))
        return None


def _read_tsv(tsv: Path, problems: list[Problem]) -> tuple[str | None, list[tuple[int, str, int]]]:
    """(root, [(line number, relative path, samples)]) with format problems recorded."""
    text = _read_text(tsv, problems)
    if text is None:
        return None, []
    lines = text.splitlines()
    if not lines:
        problems.append(Problem(str(tsv), None, "empty file (the first line must be the root folder)"))
        return None, []
    root = lines[0].strip()
    if not os.path.isdir(root):
        problems.append(Problem(str(tsv), 1, f"root folder {root!r} does not exist"))
        root = None
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit() or not fields[0]:
            problems.append(Problem(str(tsv), i, f"expected 'relative/path<TAB>num_samples', got {line!r}"))
            continue
        rows.append((i, fields[0], int(fields[1])))
    return root, rows


def _check_labels(d: Path, entries: dict[str, int], problems: list[Problem], stats: CheckStats) -> None:
    for path in sorted(d.iterdir()):
        split, _, ext = path.name.rpartition(".")
        if split not in entries or ext == "tsv" or not path.is_file():
            continue
        stats.labels.setdefault(split, []).append(ext)
        text = _read_text(path, problems)
        if text is None:
            continue
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != entries[split]:
            problems.append(
                Problem(str(path), None, f"{len(lines)} lines, but {split}.tsv has {entries[split]} entries")
            )
        empty = [i for i, line in enumerate(lines, start=1) if not line.strip()]
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            problems.append(Problem(str(path), empty[0], f"empty label line{more}"))


def _check_dicts(d: Path, problems: list[Problem]) -> None:
    for path in sorted(d.glob("dict.*.txt")):
        symbols = set()
        for i, line in enumerate((_read_text(path, problems) or "").splitlines(), start=1):
            fields = line.split()
            if len(fields) < 2 or not fields[1].lstrip("-").isdigit():
                problems.append(Problem(str(path), i, f"expected 'symbol count', got {line!r}"))
            elif fields:
                symbols.add(fields[0])
        if not symbols:
            problems.append(Problem(str(path), None, "dictionary is empty: every label would map to <unk>"))
            continue
        ext = path.name[len("dict.") : -len(".txt")]
        if ext != "ltr":
            continue  # speaker dicts cover train only; unseen valid speakers are legitimate
        for labels in sorted(d.glob("*.ltr")):
            for i, line in enumerate((_read_text(labels, []) or "").splitlines(), start=1):
                unknown = set(line.split()) - symbols
                if unknown:
                    problems.append(
                        Problem(str(labels), i, f"symbols not in {path.name}: {' '.join(sorted(unknown))}")
                    )
                    break


def format_check(manifest_dir, problems: list[Problem], stats: CheckStats) -> str:
    if problems:
        lines = [str(p) for p in problems]
        lines.append(f"{len(problems)} problem(s) in {manifest_dir}")
        return "\n".join(lines)
    parts = []
    for split, (n, seconds) in stats.splits.items():
        labels = ",".join(sorted(stats.labels.get(split, []))) or "no labels"
        parts.append(f"  {split:<10} {n:>9,} files {seconds / 3600:>9.3f} h  {labels}")
    rate = ", ".join(f"{r} Hz" for r in stats.sample_rates)
    return "\n".join([f"OK: {manifest_dir} ({rate})", *parts])
