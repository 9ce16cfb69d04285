"""speechssl manifest: scanning, bad files, labels, splits, conversion, atomic writes, --check, CLI."""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechssl.data import manifest as mf
from speechssl.data.manifest import ManifestError, NoUsableAudioError, build_manifest
from speechssl.data.manifest_check import check_manifest
from speechssl.data.manifest_scan import probe_files
from speechssl.data.text import normalize_transcript, words_to_letters

SR = 16000
WORDS = ["hello", "world's", "speech", "café", "data", "model", "seven", "blue"]


def write_corpus(root: Path, speakers=("103", "1034", "19", "250"), utts=6, chapters=1, seed=0) -> dict:
    """LibriSpeech layout speaker/chapter/spk-chap-utt.flac with a *.trans.txt per chapter.
    Returns {relative path: (frames, raw transcript)}."""
    rng = np.random.default_rng(seed)
    files = {}
    for spk in speakers:
        for c in range(chapters):
            chap = f"{100 + c}"
            d = root / spk / chap
            d.mkdir(parents=True)
            lines = []
            for u in range(utts):
                utt = f"{spk}-{chap}-{u:04d}"
                n = int(rng.integers(int(0.3 * SR), int(0.8 * SR)))
                t = np.arange(n) / SR
                x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(n)
                sf.write(d / f"{utt}.flac", x.astype(np.float32), SR)
                text = " ".join(rng.choice(WORDS, size=3)) + ", ok!"
                lines.append(f"{utt} {text}")
                files[f"{spk}/{chap}/{utt}.flac"] = (n, text)
            (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return files


def read_tsv(path: Path) -> tuple[str, list[tuple[str, int]]]:
    lines = path.read_text().splitlines()
    return lines[0], [(rel, int(n)) for rel, n in (line.split("\t") for line in lines[1:])]


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def build(audio, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("quiet", True)
    return build_manifest(audio, out, **kw)


@pytest.fixture
def corpus(tmp_path):
    audio = tmp_path / "LibriSpeech" / "train"
    return audio, write_corpus(audio)


def test_manifest_counts_labels_and_dictionaries(corpus, tmp_path):
    audio, files = corpus
    out = tmp_path / "out"
    report = build(audio, out, valid_percent=0.25)

    listed = {}
    for split in ("train", "valid"):
        root, rows = read_tsv(out / f"{split}.tsv")
        assert root == os.path.realpath(audio)
        assert [r for r, _ in rows] == sorted(r for r, _ in rows)
        for rel, n in rows:
            assert n == sf.info(os.path.join(root, rel)).frames == files[rel][0]
        wrd, ltr, spk = (read_lines(out / f"{split}.{ext}") for ext in ("wrd", "ltr", "spk"))
        assert len(wrd) == len(ltr) == len(spk) == len(rows)
        for (rel, _), w, l, s in zip(rows, wrd, ltr, spk):
            assert w == normalize_transcript(files[rel][1]) and w.endswith(" OK") and "CAFE" not in w.lower()
            assert l == words_to_letters(w)
            assert s == rel.split("/")[0]
        listed[split] = rows
    assert {r for rows in listed.values() for r, _ in rows} == set(files)
    assert len(listed["valid"]) == round(0.25 * len(files))

    counts = Counter(sym for line in read_lines(out / "train.ltr") for sym in line.split())
    entries = [line.split() for line in read_lines(out / "dict.ltr.txt")]
    assert {sym: int(n) for sym, n in entries} == counts
    assert [(-int(n), sym) for sym, n in entries] == sorted((-int(n), sym) for sym, n in entries)
    assert "|" in counts and "'" in counts
    spk_dict = {sym: int(n) for sym, n in (line.split() for line in read_lines(out / "dict.spk.txt"))}
    assert spk_dict == Counter(read_lines(out / "train.spk"))
    assert read_lines(out / "skipped.tsv") == [os.path.realpath(audio)]
    assert [s.name for s in report.splits] == ["train", "valid"]
    assert all(s.transcripts and s.speakers == 4 for s in report.splits)
    assert check_manifest(out) == []


def test_sidecar_transcripts_flat_folder(tmp_path):
    audio = tmp_path / "clips"
    audio.mkdir()
    for i, (ext, side) in enumerate([(".wav", ".txt"), (".FLAC", ".lab"), (".ogg", ".txt")]):
        sf.write(audio / f"clip{i}{ext}", np.full(SR // 2, 0.1, np.float32), SR)
        (audio / f"clip{i}{side}").write_text(f"line one {i}\nsecond-line\n")
    out = tmp_path / "out"
    report = build(audio, out, valid_percent=0)
    _, rows = read_tsv(out / "train.tsv")
    assert [r for r, _ in rows] == ["clip0.wav", "clip1.FLAC", "clip2.ogg"]
    assert read_lines(out / "train.wrd") == ["LINE ONE SECOND LINE"] * 3
    assert not (out / "valid.tsv").exists() and not (out / "train.spk").exists()
    assert report.splits[0].speakers is None


def test_partial_and_empty_transcripts(corpus, tmp_path):
    audio, files = corpus
    trans = audio / "19" / "100" / "19-100.trans.txt"
    lines = read_lines(trans)
    trans.write_text("\n".join(lines[1:-1] + [lines[-1].split()[0] + " ... !"]) + "\n")  # one missing, one empty
    out = tmp_path / "out"
    report = build(audio, out, valid_percent=0)
    assert not (out / "train.wrd").exists() and not (out / "dict.ltr.txt").exists()
    assert any("1 of 23 files" in n and "--require-transcripts" in n for n in report.notes)
    skipped = {s.path: s.category for s in report.skipped}
    assert skipped == {"19/100/19-100-0005.flac": mf.EMPTY_TRANSCRIPT}

    report = build(audio, tmp_path / "out2", valid_percent=0, require_transcripts=True)
    skipped = {s.path: s.reason for s in report.skipped}
    assert skipped["19/100/19-100-0000.flac"].startswith("no transcript")
    assert len(read_lines(tmp_path / "out2" / "train.wrd")) == len(files) - 2


def _make_bad_files(d: Path) -> dict[str, str]:
    """One file per bad case; returns {name: expected skip category}."""
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    sf.write(d / "corrupt.flac", x, SR)
    data = bytearray((d / "corrupt.flac").read_bytes())
    data[:64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    (d / "corrupt.flac").write_bytes(bytes(data))
    for ext in ("flac", "wav"):
        sf.write(d / f"cut.{ext}", x, SR)
        data = (d / f"cut.{ext}").read_bytes()
        (d / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    (d / "zero.wav").write_bytes(b"")
    sf.write(d / "noframes.wav", np.zeros(0, np.float32), SR)
    sf.write(d / "short.flac", x[: SR // 20], SR)
    nan = x.copy()
    nan[100] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    (d / "text.wav").write_text("this is not audio\n")
    os.symlink(d / "does-not-exist.flac", d / "dangling.flac")
    sf.write(d / "low.flac", x[:8000], 8000)
    sf.write(d / "stereo.flac", np.stack([x, x], axis=1), SR)
    sf.write(d / "tab\tname.flac", x, SR)
    sf.write(os.fsencode(d) + b"/latin\xe9.flac", x, SR)  # a file name that is not UTF-8
    return {
        "tab\tname.flac": "bad path", os.fsdecode(b"latin\xe9.flac"): "bad path",
        "corrupt.flac": "unreadable", "cut.flac": "truncated", "cut.wav": "truncated", "zero.wav": "empty file",
        "noframes.wav": "no audio frames", "short.flac": "too short", "nan.wav": "NaN/inf samples",
        "text.wav": "unreadable", "dangling.flac": "dangling symlink", "low.flac": "sample rate",
        "stereo.flac": "channels",
    }


def test_bad_files_are_skipped_with_reasons(corpus, tmp_path, capsys):
    audio, files = corpus
    bad_dir = audio / "250" / "100"
    expected = {mf._printable(f"250/100/{name}"): cat for name, cat in _make_bad_files(bad_dir).items()}
    out = tmp_path / "out"
    assert mf.run(_args(audio_dir=str(audio), out=str(out), valid_percent=0.0)) == 0

    root, *rows = read_lines(out / "skipped.tsv")
    assert root == os.path.realpath(audio.parent / "train")
    reasons = dict(line.split("\t") for line in rows)
    assert set(reasons) == set(expected)
    for rel, reason in reasons.items():
        assert expected[rel] in reason, (rel, reason)
    assert reasons["250/100/low.flac"] == "sample rate 8000 != 16000 (use --resample-to DIR)"
    assert "250/100/tab\\tname.flac" in reasons and "250/100/latin\\xe9.flac" in reasons
    assert {r for r, _ in read_tsv(out / "train.tsv")[1]} == set(files)  # every good file kept
    assert len(read_lines(out / "train.wrd")) == len(files)
    stdout = capsys.readouterr().out
    assert "skipped 13 files" in stdout
    for cat in ("truncated", "dangling symlink", "NaN/inf samples", "channels"):
        assert f"  {cat}  (e.g. " in stdout


def test_parallel_probe_matches_serial_and_decode_all(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    names = sorted(_make_bad_files(d))
    rng = np.random.default_rng(2)
    sf.write(d / "mid.flac", (0.1 * rng.standard_normal(10 * SR)).astype(np.float32), SR)
    data = bytearray((d / "mid.flac").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    (d / "mid.flac").write_bytes(bytes(data))
    rels = (names + ["mid.flac"]) * 8  # > 2 chunks of 32: the process pool path
    serial = probe_files(str(d), rels, workers=1, quiet=True)
    assert probe_files(str(d), rels, workers=2, quiet=True) == serial
    assert serial[len(names)].problem == ""  # damage inside the file: the cheap scan cannot see it
    assert probe_files(str(d), ["mid.flac"], workers=1, decode_all=True)[0].problem == "corrupt"


def test_nothing_usable_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_text("text")
    (bad / "y.flac").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(NoUsableAudioError, match="2 files were skipped"):
        build(bad, out)
    assert mf.run(_args(audio_dir=str(bad), out=str(out))) == 1
    captured = capsys.readouterr()
    assert "nothing was written" in captured.err and "empty file" in captured.out
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mf.run(_args(audio_dir=str(empty), out=str(out))) == 1
    assert "no audio files were found" in capsys.readouterr().err
    assert mf.run(_args(audio_dir=str(tmp_path / "missing"), out=str(out))) == 2


def test_resample_to_converts_and_links(tmp_path):
    audio = tmp_path / "raw"
    (audio / "s1" / "c1").mkdir(parents=True)
    rng = np.random.default_rng(3)
    x8 = (0.2 * rng.standard_normal(8001)).astype(np.float32)
    st = (0.2 * rng.standard_normal((SR, 2))).astype(np.float32)
    ok = (0.2 * rng.standard_normal(SR)).astype(np.float32)
    sf.write(audio / "s1" / "c1" / "low.wav", x8, 8000)
    sf.write(audio / "s1" / "c1" / "stereo.flac", st, SR)
    sf.write(audio / "s1" / "c1" / "ok.flac", ok, SR)
    conv, out = tmp_path / "conv", tmp_path / "out"
    build(audio, out, valid_percent=0, resample_to=conv)
    root, rows = read_tsv(out / "train.tsv")
    assert root == os.path.realpath(conv)
    assert dict(rows) == {"s1/c1/low.flac": math.ceil(8001 * 2), "s1/c1/ok.flac": SR, "s1/c1/stereo.flac": SR}
    for rel, n in rows:
        info = sf.info(conv / rel)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (SR, 1, n, "PCM_16")
    assert os.path.islink(conv / "s1/c1/ok.flac") and not os.path.islink(conv / "s1/c1/low.flac")
    mono, _ = sf.read(conv / "s1/c1/stereo.flac", dtype="float32")
    np.testing.assert_allclose(mono, st.mean(axis=1), atol=1 / 32768 + 1e-6)
    low, _ = sf.read(conv / "s1/c1/low.flac", dtype="float32")
    assert np.sqrt(np.mean(low**2)) == pytest.approx(np.sqrt(np.mean(x8**2)), rel=0.15)  # band-limited white
    assert check_manifest(out) == []
    mtime = os.path.getmtime(conv / "s1/c1/low.flac")
    build(audio, out, valid_percent=0, resample_to=conv, force=True)  # reuses up-to-date conversions
    assert os.path.getmtime(conv / "s1/c1/low.flac") == mtime
    with pytest.raises(ManifestError, match="overlaps"):
        build(audio, out, resample_to=audio / "conv", force=True)


def test_refuses_to_overwrite_without_force_and_removes_stale(corpus, tmp_path, capsys):
    audio, files = corpus
    out = tmp_path / "out"
    build(audio, out)
    with pytest.raises(ManifestError, match=r"dict\.ltr\.txt.*train\.tsv.*--force"):
        build(audio, out)
    assert mf.run(_args(audio_dir=str(audio), out=str(out))) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    for trans in audio.rglob("*.trans.txt"):
        trans.unlink()
    (out / "train.km").write_text("1 2 3\n")
    report = build(audio, out, force=True)
    assert not (out / "train.wrd").exists() and not (out / "dict.ltr.txt").exists()
    assert str(out / "train.wrd") in report.removed
    assert any("train.km" in n for n in report.notes)
    assert (out / "train.spk").exists()


def test_interrupted_write_leaves_old_manifest(corpus, tmp_path, monkeypatch):
    audio, _ = corpus
    out = tmp_path / "out"
    build(audio, out, valid_percent=0.2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = mf._write_lines

    def failing(fh, lines):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk full")
        real(fh, lines)

    monkeypatch.setattr(mf, "_write_lines", failing)
    with pytest.raises(OSError, match="disk full"):
        build(audio, out, valid_percent=0.5, seed=7, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files, old content


def test_split_by_speaker_holds_out_whole_speakers(tmp_path):
    audio = tmp_path / "a"
    write_corpus(audio, speakers=[f"{s}" for s in range(10, 20)], utts=3)
    out = tmp_path / "out"
    build(audio, out, valid_percent=0.2, split_by="speaker")
    train, valid = set(read_lines(out / "train.spk")), set(read_lines(out / "valid.spk"))
    assert len(valid) == 2 and len(train) == 8 and not train & valid
    assert len(read_lines(out / "valid.spk")) == 6


def test_split_by_utterance_keeps_every_speaker_in_train(tmp_path):
    audio = tmp_path / "a"
    files = write_corpus(audio, speakers=[f"{s}" for s in range(10, 16)], utts=5)
    out = tmp_path / "out"
    build(audio, out, valid_percent=0.3)
    train, valid = read_lines(out / "train.spk"), read_lines(out / "valid.spk")
    assert set(train) == {f"{s}" for s in range(10, 16)} and set(valid) <= set(train)
    assert len(valid) == round(0.3 * len(files)) and len(set(valid)) >= 5  # spread over speakers


def test_add_split_uses_own_roots_and_disables_carving(tmp_path):
    base = tmp_path / "LibriSpeech"
    train_files = write_corpus(base / "train-clean-100", utts=4)
    dev_files = write_corpus(base / "dev-clean", speakers=("84", "174"), utts=3, seed=1)
    write_corpus(base / "test-clean", speakers=("61",), utts=2, seed=2)
    (base / "dev-clean" / "84" / "100" / "bad.wav").write_text("no")
    out = tmp_path / "out"
    report = build(base / "train-clean-100", out, add_splits={"valid": base / "dev-clean", "test": base / "test-clean"})
    assert [s.name for s in report.splits] == ["train", "valid", "test"]
    for split, folder, files in (("train", "train-clean-100", train_files), ("valid", "dev-clean", dev_files)):
        root, rows = read_tsv(out / f"{split}.tsv")
        assert root == os.path.realpath(base / folder) and {r for r, _ in rows} == set(files)
        assert len(read_lines(out / f"{split}.ltr")) == len(rows)
    assert read_tsv(out / "test.tsv")[0] == os.path.realpath(base / "test-clean")
    assert read_lines(out / "skipped.tsv") == [
        os.path.realpath(base), "dev-clean/84/100/bad.wav\tunreadable: not an audio file soundfile can read "
        "(Format not recognised.)"]
    with pytest.raises(ManifestError, match="--add-split name"):
        build(base / "train-clean-100", tmp_path / "o2", add_splits={"train": base / "dev-clean"})


def test_train_seconds_subset_is_bounded_balanced_and_seeded(tmp_path):
    audio = tmp_path / "a"
    files = write_corpus(audio, utts=10)
    longest = max(n for n, _ in files.values()) / SR

    def subset(seed, out):
        build(audio, tmp_path / out, valid_percent=0, train_seconds=4.0, seed=seed)
        _, rows = read_tsv(tmp_path / out / "train.tsv")
        return rows, read_lines(tmp_path / out / "train.spk")

    rows, spk = subset(42, "o1")
    per_speaker = defaultdict(float)
    for (rel, n), s in zip(rows, spk):
        per_speaker[s] += n / SR
    assert sum(per_speaker.values()) <= 4.0
    assert sum(per_speaker.values()) > 4.0 - longest
    assert len(per_speaker) == 4 and max(per_speaker.values()) - min(per_speaker.values()) <= longest
    assert subset(42, "o2") == (rows, spk)
    assert subset(1, "o3")[0] != rows


def test_same_seed_same_manifest(corpus, tmp_path):
    audio, _ = corpus
    a = build(audio, tmp_path / "a", valid_percent=0.3, workers=2)
    build(audio, tmp_path / "b", valid_percent=0.3, workers=1)
    build(audio, tmp_path / "c", valid_percent=0.3, seed=3)
    for name in ("train.tsv", "valid.tsv", "valid.wrd", "dict.ltr.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert read_lines(tmp_path / "a" / "valid.tsv") != read_lines(tmp_path / "c" / "valid.tsv")
    assert a.splits[1].files == 7


def test_speaker_regex(tmp_path):
    audio = tmp_path / "flat"
    audio.mkdir()
    for spk in ("ann", "bob"):
        for i in range(3):
            sf.write(audio / f"{spk}_{i}.wav", np.full(SR // 4, 0.1, np.float32), SR)
    out = tmp_path / "out"
    build(audio, out, valid_percent=0, speaker_regex=r"^([a-z]+)_")
    assert read_lines(out / "train.spk") == ["ann"] * 3 + ["bob"] * 3
    with pytest.raises(ManifestError, match="exactly one"):
        build(audio, tmp_path / "o2", speaker_regex=r"^[a-z]+_")
    with pytest.raises(ManifestError, match="needs a speaker"):
        build(audio, tmp_path / "o3", split_by="speaker")


def test_check_reports_broken_manifest(corpus, tmp_path, capsys):
    audio, files = corpus
    out = tmp_path / "out"
    build(audio, out, valid_percent=0.2)
    assert check_manifest(out) == []
    assert mf.run(_args(check=str(out))) == 0
    assert capsys.readouterr().out.startswith(f"OK: {out} (16000 Hz)")

    root, rows = read_tsv(out / "train.tsv")
    os.unlink(os.path.join(root, rows[0][0]))
    lines = read_lines(out / "train.tsv")
    rel, n = lines[2].split("\t")
    lines[2] = f"{rel}\t{int(n) + 5}"
    (out / "train.tsv").write_text("\n".join(lines) + "\n")
    (out / "valid.wrd").write_text("\n".join(read_lines(out / "valid.wrd")[1:]) + "\n")
    (out / "dict.spk.txt").write_text("")
    problems = [str(p) for p in check_manifest(out)]
    assert any(p.startswith(f"{out / 'train.tsv'}:2: {rows[0][0]}: file not found") for p in problems)
    assert any(p.startswith(f"{out / 'train.tsv'}:3: ") and f"says {int(n) + 5} samples" in p for p in problems)
    assert any(p.startswith(f"{out / 'valid.wrd'}: ") and "valid.tsv has" in p for p in problems)
    assert any("dict.spk.txt" in p and "empty" in p for p in problems)
    assert len(problems) == 4
    assert mf.run(_args(check=str(out))) == 1
    assert "4 problem(s)" in capsys.readouterr().out


def test_check_mixed_rates_and_unknown_letters(tmp_path):
    audio = tmp_path / "a"
    write_corpus(audio, speakers=("1", "2"), utts=2)
    sf.write(tmp_path / "low.flac", np.zeros(4000, np.float32), 8000)
    out = tmp_path / "out"
    build(audio, out, valid_percent=0)
    (out / "extra.tsv").write_text(f"{tmp_path}\nlow.flac\t4000\n")
    (out / "extra.ltr").write_text("H E | 7 |\n")
    problems = [str(p) for p in check_manifest(out)]
    assert problems == [
        f"{out / 'extra.tsv'}:2: low.flac: sample rate 8000 (mixed rates: 16000 Hz: 4 files, 8000 Hz: 1 files)",
        f"{out / 'extra.ltr'}:1: symbols not in dict.ltr.txt: 7",
    ]


def test_cli_main(corpus, tmp_path, capsys):
    from speechssl.cli import main

    audio, files = corpus
    out = tmp_path / "out"
    assert main(["manifest", str(audio), "--out", str(out), "--workers", "1", "--quiet", "--valid-percent", "0.1",
                 "--add-split", f"test={audio}", "--min-seconds", "0.5"]) == 0
    stdout = capsys.readouterr().out
    assert "train" in stdout and "test" in stdout and "too short" in stdout
    assert "split 'test' were dropped by --min-seconds/--max-seconds" in stdout
    n_short = sum(n < 0.5 * SR for n, _ in files.values())
    assert len(read_lines(out / "skipped.tsv")) == 1 + 2 * n_short  # AUDIO_DIR scanned twice
    assert main(["manifest", "--check", str(out)]) == 0
    assert main(["manifest", str(audio)]) == 2
    with pytest.raises(SystemExit):
        main(["manifest", "--add-split", "nodir", str(audio), "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["manifest", "--help"])
    assert "speechssl manifest --check" in capsys.readouterr().out


def _args(**kw):
    """Parsed defaults of the command with overrides, as ``run`` receives them."""
    import argparse

    p = argparse.ArgumentParser()
    mf.add_arguments(p)
    args = p.parse_args([])
    args.quiet, args.workers = True, 1
    for k, v in kw.items():
        setattr(args, k, v)
    return args
