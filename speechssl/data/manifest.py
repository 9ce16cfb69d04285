"""``speechssl manifest``: audio folder -> fairseq manifests (TSV + transcripts + speakers), or ``--check``.

Library entry points: :func:`build_manifest` (returns a :class:`ManifestReport`) and
:func:`speechssl.data.manifest_check.check_manifest`. The formats are documented in manifests/README.md:

* ``<split>.tsv``: first line the absolute root folder, then ``relative/path<TAB>num_samples``;
* ``<split>.wrd`` / ``<split>.ltr`` / ``<split>.spk``: one line per TSV entry, in the same order;
* ``dict.ltr.txt`` / ``dict.spk.txt``: ``symbol count`` lines from the train split;
* ``skipped.tsv``: first line the common root of the scanned folders, then ``relative/path<TAB>reason``.

Pipeline: discover files (:mod:`manifest_scan`) -> probe them in a process pool -> drop unusable files
with a reason -> attach transcripts and speakers (:mod:`manifest_labels`) -> carve valid / subset train
(:mod:`manifest_split`) -> optionally convert to 16 kHz mono (:mod:`manifest_convert`) -> write every
file atomically, all renamed only once all are complete.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from speechssl.utils.args import NON_NEGATIVE, POSITIVE, number
from speechssl.utils.io import file_in_the_way

DESCRIPTION = """\
Scan an audio folder recursively (every format soundfile reads: flac, wav, ogg, mp3, ...) and write
fairseq wav2vec/HuBERT manifests: train.tsv and valid.tsv (root line, then 'path<TAB>num_samples'),
and, when transcripts are found (LibriSpeech *.trans.txt, or a .txt/.lab beside each file), aligned
.wrd/.ltr label files and dict.ltr.txt; with speakers (LibriSpeech layout speaker/chapter/file, or
--speaker-regex) aligned .spk files and dict.spk.txt. Unusable files (unreadable, truncated, empty,
NaN, too short/long, wrong sample rate or channels) are listed with the reason in skipped.tsv.
Formats: manifests/README.md. Exit status: 0 done, 1 nothing usable / --check found problems,
2 bad arguments or existing manifest files without --force.

Examples:
  # LibriSpeech: 1% of each speaker's utterances for validation, dev/test as extra splits
  speechssl manifest LibriSpeech/train-clean-100 --out manifests/ls100 \\
      --add-split dev=LibriSpeech/dev-clean --add-split test=LibriSpeech/test-clean

  # pretraining on any folder, hold out whole speakers, drop clips outside 2-20 s
  speechssl manifest /data/audio --out manifests/pt --split-by speaker --valid-percent 0.05 \\
      --min-seconds 2 --max-seconds 20 --speaker-regex '^([^/]+)/'

  # a speaker-balanced 10-minute labeled fine-tuning set (Libri-light style), valid from dev-clean
  speechssl manifest LibriSpeech/train-clean-100 --out manifests/ft10m --train-seconds 600 \\
      --add-split valid=LibriSpeech/dev-clean --require-transcripts

  # 8 kHz / stereo files: convert to 16 kHz mono FLAC under converted/ and list those instead
  speechssl manifest /data/callcenter --out manifests/cc --resample-to /data/callcenter-16k

  # validate a manifest folder (files exist, sample counts, label alignment, one sample rate)
  speechssl manifest --check manifests/ls100
"""

LABEL_EXTS = ("wrd", "ltr", "spk")  # label files this command writes (and replaces with --force)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_RESERVED_SPLITS = {"train", "dict", "skipped"}

# skip categories added to those of manifest_scan
BAD_PATH = "bad path"
TOO_SHORT = "too short"
TOO_LONG = "too long"
SAMPLE_RATE = "sample rate"
CHANNELS = "channels"
NO_TRANSCRIPT = "no transcript"
EMPTY_TRANSCRIPT = "empty transcript"


class ManifestError(ValueError):
    """Bad arguments, or outputs that would be overwritten: the message says what to do."""


class NoUsableAudioError(ManifestError):
    """Nothing usable was found; ``report`` holds what was skipped and why."""

    def __init__(self, message: str, report: ManifestReport):
        super().__init__(message)
        self.report = report


@dataclass
class Utterance:
    rel: str  # path relative to its source folder (sort key, speaker and transcript lookups)
    frames: int
    sample_rate: int
    channels: int
    speaker: str | None = None
    words: str | None = None  # normalized transcript
    path: str = ""  # path in the TSV, relative to the split root: rel, or the converted file's

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    @property
    def sort_key(self) -> str:
        return self.rel


@dataclass
class Skipped:
    path: str  # relative to ManifestReport.skip_root
    category: str
    reason: str


@dataclass
class SplitSummary:
    name: str
    root: str
    files: int
    seconds: float
    speakers: int | None  # None: no speaker labels
    transcripts: bool


@dataclass
class ManifestReport:
    out_dir: str
    skip_root: str
    splits: list[SplitSummary] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skipped_by_category(self) -> dict[str, list[Skipped]]:
        groups: dict[str, list[Skipped]] = defaultdict(list)
        for s in self.skipped:
            groups[s.category].append(s)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    def summary(self) -> str:
        lines = []
        if self.splits:
            lines.append(f"manifest {self.out_dir}:")
            lines.append(f"  {'split':<10} {'files':>9} {'hours':>9} {'speakers':>9}  transcripts")
            for s in self.splits:
                spk = "-" if s.speakers is None else f"{s.speakers:,}"
                lines.append(
                    f"  {s.name:<10} {s.files:>9,} {s.seconds / 3600:>9.3f} {spk:>9}  {'yes' if s.transcripts else 'no'}"
                )
        where = f" (listed in {os.path.join(self.out_dir, 'skipped.tsv')})" if self.written and self.skipped else ""
        lines.append(f"skipped {len(self.skipped):,} files{where}" + (":" if self.skipped else ""))
        for category, items in self.skipped_by_category().items():
            lines.append(f"  {len(items):>7,}  {category}  (e.g. {_printable(items[0].path)}: {items[0].reason})")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class _Source:
    split: str  # "train" for AUDIO_DIR (valid is carved from it), else the --add-split name
    root: str  # real absolute path
    utts: list[Utterance] = field(default_factory=list)
    has_words: bool = False
    has_speakers: bool = False


def build_manifest(
    audio_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    add_splits: dict[str, str | os.PathLike] | None = None,
    valid_percent: float = 0.01,
    seed: int = 42,
    split_by: str = "utterance",
    min_seconds: float = 0.1,
    max_seconds: float | None = None,
    train_seconds: float | None = None,
    target_sr: int = 16000,
    resample_to: str | os.PathLike | None = None,
    speaker_regex: str | None = None,
    require_transcripts: bool = False,
    decode_all: bool = False,
    workers: int | None = None,
    force: bool = False,
    quiet: bool = False,
) -> ManifestReport:
    """Scan ``audio_dir`` (and each ``add_splits`` folder) and write manifests into ``out_dir``.

    Raises :class:`ManifestError` for bad options or existing outputs without ``force``, and
    :class:`NoUsableAudioError` (nothing written) when a split would be empty."""
    from speechssl.data.manifest_labels import compile_speaker_regex
    from speechssl.data.manifest_scan import default_workers
    from speechssl.data.manifest_split import SplitError, balanced_subset, carve_valid

    add_splits = dict(add_splits or {})
    _validate(add_splits, valid_percent, split_by, min_seconds, max_seconds, train_seconds, target_sr)
    try:
        regex = compile_speaker_regex(speaker_regex)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None
    out = Path(out_dir).absolute()
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise ManifestError(f"--out {out_dir}: {blocker} is a file, not a folder; choose another --out")
    carve = "valid" not in add_splits and valid_percent > 0
    splits = ["train"] + (["valid"] if carve else []) + list(add_splits)
    existing = existing_outputs(out, splits)
    if existing and not force:
        raise ManifestError(
            f"refusing to overwrite existing manifest files in {out}: {', '.join(existing)} (pass --force to replace them)"
        )
    sources = [_Source("train", _real_dir(audio_dir, "AUDIO_DIR"))]
    sources += [_Source(name, _real_dir(d, f"--add-split {name}")) for name, d in add_splits.items()]
    skip_root = os.path.commonpath([s.root for s in sources])
    conv_root = _check_resample_to(resample_to, [s.root for s in sources]) if resample_to else None
    report = ManifestReport(out_dir=str(out), skip_root=skip_root)
    opts = dict(min_seconds=min_seconds, max_seconds=max_seconds, target_sr=target_sr, convert=conv_root is not None)
    for src in sources:
        _scan_source(src, report, regex, require_transcripts, decode_all, workers or default_workers(), quiet, opts)

    try:
        by_split = {"train": sources[0].utts}
        if carve:
            by_split["train"], by_split["valid"] = carve_valid(sources[0].utts, valid_percent, seed, split_by)
        if train_seconds is not None:
            by_split["train"] = balanced_subset(by_split["train"], train_seconds, seed)
    except SplitError as exc:
        raise ManifestError(str(exc)) from None
    by_split.update({src.split: src.utts for src in sources[1:]})
    source_of = {name: sources[0] for name in ("train", "valid")} | {s.split: s for s in sources[1:]}
    roots = {name: source_of[name].root for name in by_split}
    if conv_root is not None:
        from speechssl.data.manifest_convert import convert_splits

        roots, dropped = convert_splits(
            by_split, {name: source_of[name].root for name in by_split}, skip_root, conv_root, target_sr,
            workers or default_workers(), quiet,
        )
        report.skipped.extend(Skipped(*d) for d in dropped)
    if carve and not by_split["valid"] and by_split["train"]:
        report.notes.append(
            "valid is empty: every speaker has a single utterance, which stays in train (try --split-by speaker)"
        )
    empty = [name for name in ("train", *add_splits) if not by_split[name]]
    if empty:
        raise NoUsableAudioError(_nothing_usable_message(empty, source_of, report), report)

    outputs = _outputs(by_split, source_of, roots, report)
    _write_all(out, outputs, existing, report)
    for name in splits:
        utts = by_split[name]
        src = source_of[name]
        speakers = len({u.speaker for u in utts}) if src.has_speakers else None
        report.splits.append(
            SplitSummary(name, roots[name], len(utts), sum(u.seconds for u in utts), speakers, src.has_words)
        )
    return report


def _validate(add_splits, valid_percent, split_by, min_seconds, max_seconds, train_seconds, target_sr) -> None:
    for name in add_splits:
        if not _SPLIT_NAME.match(name) or name in _RESERVED_SPLITS:
            raise ManifestError(
                f"--add-split name {name!r}: use letters, digits, '_' or '-', and not train/dict/skipped"
            )
    if not 0 <= valid_percent < 1:
        raise ManifestError(f"--valid-percent is a fraction in [0, 1) (0.01 = 1%), got {valid_percent}")
    if split_by not in ("utterance", "speaker"):
        raise ManifestError(f"--split-by must be 'utterance' or 'speaker', got {split_by!r}")
    if min_seconds < 0 or (max_seconds is not None and max_seconds <= min_seconds):
        raise ManifestError(f"need 0 <= --min-seconds < --max-seconds, got {min_seconds} and {max_seconds}")
    if train_seconds is not None and train_seconds <= 0:
        raise ManifestError(f"--train-seconds must be > 0, got {train_seconds}")
    if target_sr <= 0:
        raise ManifestError(f"--target-sr must be > 0, got {target_sr}")


def _real_dir(path, what: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ManifestError(f"{what}: folder not found: {path}")
    return real


def _check_resample_to(resample_to, roots: list[str]) -> str:
    conv = os.path.realpath(resample_to)
    for root in roots:
        if os.path.commonpath([conv, root]) in (conv, root):
            raise ManifestError(
                f"--resample-to {resample_to} overlaps the audio folder {root}: choose a folder outside it"
            )
    return conv


def existing_outputs(out: Path, splits: list[str]) -> list[str]:
    """Files this command would write (or leave stale) in ``out`` that already exist."""
    names = {f"{s}.{ext}" for s in {*splits, "valid"} for ext in ("tsv", *LABEL_EXTS)}
    names |= {"dict.ltr.txt", "dict.spk.txt", "skipped.tsv"}
    return sorted(n for n in names if os.path.lexists(out / n))


def _scan_source(src: _Source, report, regex, require_transcripts, decode_all, workers, quiet, opts) -> None:
    """Discover and probe the files of one source folder; keep the usable ones in ``src.utts``."""
    from speechssl.data.manifest_labels import Transcripts, speaker_of
    from speechssl.data.manifest_scan import DANGLING, discover, probe_files
    from speechssl.data.text import normalize_transcript

    found = discover(src.root)
    prefix = os.path.relpath(src.root, report.skip_root)
    prefix = "" if prefix == "." else prefix + "/"

    def skip(rel: str, category: str, reason: str) -> None:
        report.skipped.append(Skipped(prefix + rel, category, reason))

    for rel in found.dangling:
        skip(rel, DANGLING, f"dangling symlink -> {os.readlink(os.path.join(src.root, rel))}")
    report.notes.extend(found.errors)
    probes = probe_files(src.root, found.audio, workers, decode_all, quiet, desc=f"scanning {src.split}")
    transcripts = Transcripts(found)
    by_duration = 0
    for rel, p in zip(found.audio, probes):
        problem = (p.problem, p.detail) if p.problem else _check_format(rel, p, **opts)
        if problem:
            skip(rel, *problem)
            by_duration += problem[0] in (TOO_SHORT, TOO_LONG)
            continue
        utt = Utterance(rel, p.frames, p.sample_rate, p.channels, speaker_of(rel, regex), path=rel)
        raw = transcripts.get(rel)
        if raw is not None:
            utt.words = normalize_transcript(raw)
            if not utt.words:
                skip(rel, EMPTY_TRANSCRIPT, "empty transcript" + (f" ({raw!r})" if raw else ""))
                continue
        elif require_transcripts:
            skip(rel, NO_TRANSCRIPT, "no transcript (no sidecar .txt/.lab, no line in a *.trans.txt)")
            continue
        src.utts.append(utt)
    report.notes.extend(transcripts.warnings)
    if src.split != "train" and by_duration:
        report.notes.append(
            f"{by_duration} files of split '{src.split}' were dropped by --min-seconds/--max-seconds: scores on it "
            "are not comparable with published ones; make its manifest in a separate run without those filters"
        )

    n = len(src.utts)
    with_words = sum(u.words is not None for u in src.utts)
    with_speaker = sum(u.speaker is not None for u in src.utts)
    src.has_words = n > 0 and with_words == n
    src.has_speakers = n > 0 and with_speaker == n
    where = f"{src.root} ({src.split})"
    if 0 < with_words < n:
        report.notes.append(
            f"{n - with_words} of {n} files in {where} have no transcript, so no .wrd/.ltr files were written "
            "for it; pass --require-transcripts to skip those files instead"
        )
    if 0 < with_speaker < n:
        report.notes.append(f"{n - with_speaker} of {n} files in {where} have no speaker, so no .spk file was written")


def _check_format(rel, p, min_seconds, max_seconds, target_sr, convert) -> tuple[str, str] | None:
    if "\t" in rel or "\n" in rel or "\r" in rel:
        return BAD_PATH, "bad path: it contains a tab or newline, which the TSV format cannot hold"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return BAD_PATH, "bad path: the file name is not valid UTF-8 (manifests are UTF-8 text): rename it"
    if p.sample_rate != target_sr and not convert:
        return SAMPLE_RATE, f"sample rate {p.sample_rate} != {target_sr} (use --resample-to DIR)"
    if p.channels != 1 and not convert:
        return CHANNELS, f"{p.channels} channels, expected mono (use --resample-to DIR to downmix)"
    seconds = p.frames / p.sample_rate
    if seconds < min_seconds:
        return TOO_SHORT, f"too short: {seconds:.3f} s < --min-seconds {min_seconds:g}"
    if max_seconds is not None and seconds > max_seconds:
        return TOO_LONG, f"too long: {seconds:.3f} s > --max-seconds {max_seconds:g}"
    return None


def _nothing_usable_message(empty, source_of, report) -> str:
    parts = []
    for name in empty:
        root = source_of[name].root
        parts.append(f"no usable audio for split '{name}' in {root}")
    n_skipped = len(report.skipped)
    hint = f"; {n_skipped} files were skipped (reasons below)" if n_skipped else (
        "; no audio files were found (looked for extensions: flac, wav, ogg, mp3 and every other format "
        "soundfile reads)"
    )
    return "; ".join(parts) + hint


def _outputs(by_split, source_of, roots, report) -> dict[str, list[str]]:
    """Every file to write, as lines (without newlines)."""
    from speechssl.data.manifest_labels import count_dictionary
    from speechssl.data.text import words_to_letters

    out: dict[str, list[str]] = {}
    for name, utts in by_split.items():
        src = source_of[name]
        out[f"{name}.tsv"] = [roots[name]] + [f"{u.path}\t{u.frames}" for u in utts]
        if src.has_words:
            out[f"{name}.wrd"] = [u.words for u in utts]
            out[f"{name}.ltr"] = [words_to_letters(u.words) for u in utts]
        if src.has_speakers:
            out[f"{name}.spk"] = [u.speaker for u in utts]
    if "train.ltr" in out:
        out["dict.ltr.txt"] = [f"{sym} {n}" for sym, n in count_dictionary(out["train.ltr"])]
    if "train.spk" in out:
        out["dict.spk.txt"] = [f"{sym} {n}" for sym, n in count_dictionary(out["train.spk"])]
    out["skipped.tsv"] = [report.skip_root] + [f"{_printable(s.path)}\t{s.reason}" for s in report.skipped]
    return out


def _printable(path: str) -> str:
    """A path as one TSV field: tabs/newlines and undecodable bytes escaped."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _write_lines(fh, lines: list[str]) -> None:
    fh.write("".join(line + "\n" for line in lines))


def _write_all(out: Path, outputs: dict[str, list[str]], existing: list[str], report: ManifestReport) -> None:
    """Write every output to a temp file first, then rename them all: an exception while writing
    leaves the old manifest untouched. Stale outputs of an earlier run (e.g. a train.wrd when this run
    found no transcripts) are removed; other label files of the rewritten splits get a note."""
    from speechssl.utils.io import atomic_open

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        for name, lines in outputs.items():
            _write_lines(stack.enter_context(atomic_open(out / name, "w")), lines)
    report.written = [str(out / name) for name in outputs]
    for name in existing:
        if name not in outputs:
            (out / name).unlink()
            report.removed.append(str(out / name))
    splits = {name[:-4] for name in outputs if name.endswith(".tsv") and name != "skipped.tsv"}
    for path in sorted(out.iterdir()):
        split, _, ext = path.name.rpartition(".")
        if split in splits and ext not in ("tsv", *LABEL_EXTS):
            report.notes.append(f"{path.name} was made for the previous {split}.tsv: regenerate it")


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _split_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (e.g. test=LibriSpeech/test-clean), got {text!r}")
    return name, path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio_dir", nargs="?", metavar="AUDIO_DIR", help="folder scanned recursively for audio files")
    p.add_argument("--out", metavar="DIR", help="manifest folder to write (train.tsv, valid.tsv, labels, dicts)")
    p.add_argument("--check", metavar="DIR", help="validate the manifest folder DIR instead of building one")
    g = p.add_argument_group("splits")
    g.add_argument("--valid-percent", type=number(0, 1, high_open=True), default=0.01,
                   help="fraction (0.01 = 1%%) carved out for valid.tsv")
    g.add_argument("--seed", type=NON_NEGATIVE, default=42, help="seed of the valid split and --train-seconds subset")
    g.add_argument("--split-by", choices=("utterance", "speaker"), default="utterance",
                   help="utterance: a share of each speaker's files (closed set); speaker: hold out whole speakers")
    g.add_argument("--add-split", type=_split_arg, action="append", default=[], metavar="NAME=DIR",
                   help="extra split from another folder (repeatable); valid=DIR replaces the random valid split")
    g.add_argument("--train-seconds", type=number(0, low_open=True), metavar="S",
                   help="keep a seeded, speaker-balanced subset of train of at most S seconds (600 = 10 min)")
    f = p.add_argument_group("filters and labels")
    f.add_argument("--min-seconds", type=number(0), default=0.1, help="skip files shorter than this")
    f.add_argument("--max-seconds", type=number(0, low_open=True), help="skip files longer than this")
    f.add_argument("--target-sr", type=POSITIVE, default=16000,
                   help="required sample rate (others skipped or converted)")
    f.add_argument("--resample-to", metavar="DIR",
                   help="write 16-bit FLAC mono/--target-sr copies of mismatched files under DIR (symlinks for "
                   "the others) and list those")
    f.add_argument("--speaker-regex", metavar="REGEX",
                   help="speaker = group 1 of REGEX searched in the relative path; without it, the "
                   "LibriSpeech layout speaker/chapter/file")
    f.add_argument("--require-transcripts", action="store_true", help="skip files without a transcript")
    f.add_argument("--decode-all", action="store_true",
                   help="decode every file fully (slow) to catch corruption inside files, not only at the end")
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=NON_NEGATIVE, default=0, help="scan/convert processes; 0 = all cores")
    r.add_argument("--force", action="store_true", help="replace existing manifest files in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    prog = "speechssl manifest"
    if args.check:
        if args.audio_dir or args.out:
            print(f"{prog}: --check DIR takes no AUDIO_DIR or --out", file=sys.stderr)
            return 2
        from speechssl.data.manifest_check import check_manifest, format_check

        problems, stats = check_manifest(args.check, workers=args.workers or None, quiet=args.quiet, with_stats=True)
        print(format_check(args.check, problems, stats))
        return 1 if problems else 0
    if not args.audio_dir or not args.out:
        print(f"{prog}: give AUDIO_DIR and --out DIR (or --check DIR); see 'speechssl manifest --help'", file=sys.stderr)
        return 2
    names = [name for name, _ in args.add_split]
    if len(set(names)) != len(names):
        print(f"{prog}: error: --add-split names must differ, got {', '.join(names)}", file=sys.stderr)
        return 2
    try:
        report = build_manifest(
            args.audio_dir, args.out, add_splits=dict(args.add_split), valid_percent=args.valid_percent,
            seed=args.seed, split_by=args.split_by, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
            train_seconds=args.train_seconds, target_sr=args.target_sr, resample_to=args.resample_to,
            speaker_regex=args.speaker_regex, require_transcripts=args.require_transcripts,
            decode_all=args.decode_all, workers=args.workers or None, force=args.force, quiet=args.quiet,
        )
    except NoUsableAudioError as exc:
        print(exc.report.summary())
        print(f"{prog}: error: {exc}; nothing was written", file=sys.stderr)
        return 1
    except ManifestError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
