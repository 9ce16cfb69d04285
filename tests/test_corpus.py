"""The offline demo corpus synthesizer: layout, audio format, transcripts, speakers, determinism, reuse."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechssl import corpus
from speechssl.corpus import build, common, render, sentences, voices
from speechssl.data.text import normalize_transcript

TOOLS = Path(__file__).resolve().parent.parent / "tools"
pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None for b in ("sox", "espeak-ng", "flite", "festival"))
    or not sentences.FORTUNE_DIR.is_dir() or not sentences.DICT_PATH.is_file(),
    reason="needs the Debian packages of tools/setup.sh (sox espeak-ng flite festival fortunes wamerican ...)",
)
TINY = dict(minutes=0.5, speakers=4, pool_minutes=0.3, pool_speakers=2, progress=False)
NO_POOL = dict(pool_minutes=0, pool_speakers=0)


def _flacs(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*/*.flac"))


def _transcripts(root: Path) -> dict[str, str]:
    lines = {}
    for trans in sorted(root.glob("*/*/*/*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            utt_id, text = line.split(" ", 1)
            lines[utt_id] = text
    return lines


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> tuple[Path, corpus.CorpusSummary]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    return out, corpus.synthesize_corpus(out, seed=0, workers=2, **TINY)


def test_sentence_pool_is_large_clean_and_distinct():
    pool = corpus.build_sentence_pool()
    assert len(pool) > 5000
    assert len(set(pool.transcript)) == len(pool)
    vocabulary = {w.strip().lower() for w in sentences.DICT_PATH.read_text("utf-8", "replace").split()}
    for text, transcript in zip(pool.text, pool.transcript):
        assert transcript == normalize_transcript(text)
        words = transcript.split()
        assert common.MIN_WORDS <= len(words) <= common.MAX_WORDS
        assert not re.search(r"\d", text)
        assert all(w.lower() in vocabulary for w in words), transcript


def test_speaker_plan_is_diverse_and_split():
    inventory = corpus.available_voices()
    plan = corpus.plan_speakers(0, 30, 3, 3, 2700.0, inventory)
    assert [s.speaker_id for s in plan] == list(range(100, 130))
    assert [sum(s.subset == k for s in plan) for k in common.SUBSETS] == [24, 3, 3, 0]
    assert abs(sum(s.sex == "F" for s in plan) - 15) <= 1
    for subset in ("dev", "test"):
        assert {s.sex for s in plan if s.subset == subset} == {"F", "M"}
    assert {s.voice.engine for s in plan} == set(common.ENGINES)
    assert len({s.describe() for s in plan}) == 30
    espeak = [s.voice.name for s in plan if s.voice.engine == "espeak-ng"]
    assert len(espeak) == 15 and len(set(espeak)) == 15
    for name in {s.voice.name for s in plan if s.voice.engine != "espeak-ng"}:  # same voice -> spread apart
        same = [s for s in plan if s.voice.name == name]
        for a, b in zip(same, same[1:]):
            assert abs(a.formant - b.formant) > 0.005 or abs(a.rate - b.rate) > 0.02
    assert sum(s.seconds for s in plan) == pytest.approx(2700.0)
    assert plan == corpus.plan_speakers(0, 30, 3, 3, 2700.0, inventory)
    assert plan != corpus.plan_speakers(1, 30, 3, 3, 2700.0, inventory)


def test_every_chapter_is_a_recording_session_of_its_own():
    """Chapters of at most 45 s, at least 3 per speaker from a minute of audio on, each with its own
    microphone / room / noise colour; the voice settings stay the speaker's."""
    inventory = corpus.available_voices()
    plan = corpus.plan_speakers(0, 30, 3, 3, 2700.0, inventory)
    for s in plan:
        assert len(s.chapters) == len(s.sessions) == voices.chapter_count(s.seconds)
        assert len(s.chapters) >= 3 and s.seconds / len(s.chapters) <= common.CHAPTER_SECONDS
        assert len({x.describe() for x in s.sessions}) == len(s.sessions)
    assert voices.chapter_count(30.0) == 1 and voices.chapter_count(200.0) == 5


def test_pool_speakers_are_many_and_never_share_a_dev_or_test_voice():
    """The demo's unlabeled pool: 160 speakers of its own with 5.5 h among them; no pool speaker has the
    espeak-ng voice (accent+variant) of a dev or test speaker, and no two speakers share every setting."""
    inventory = corpus.available_voices()
    plan = corpus.plan_speakers(0, 30, 3, 3, 2700.0, inventory, n_pool=160, pool_seconds=19800.0)
    assert [sum(s.subset == k for s in plan) for k in common.SUBSETS] == [24, 3, 3, 160]
    pool = [s for s in plan if s.subset == "pool"]
    assert sum(s.seconds for s in pool) == pytest.approx(19800.0)
    assert sum(s.seconds for s in plan if s.subset != "pool") == pytest.approx(2700.0)
    assert {s.sex for s in pool} == {"F", "M"} and {s.voice.engine for s in pool} == set(common.ENGINES)
    espeak = [s.voice.name for s in plan if s.voice.engine == "espeak-ng"]
    assert len(espeak) == len(set(espeak)) >= 90
    held_out = {s.voice.name for s in plan if s.subset in ("dev", "test") and s.voice.engine == "espeak-ng"}
    assert held_out and not held_out & {s.voice.name for s in pool}
    assert len({s.describe() for s in plan}) == 190


def test_layout_and_transcripts_match_audio(tiny_corpus):
    out, summary = tiny_corpus
    assert sorted(p.name for p in out.iterdir()) == ["CHAPTERS.TXT", "SPEAKERS.TXT", "dev", "pool",
                                                     "synth_config.json", "synth_summary.json", "test", "train"]
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary build directory left
    flacs = _flacs(out)
    transcripts = _transcripts(out)
    for flac in flacs:
        subset, speaker, chapter = flac.parts[-4:-1]
        assert subset in common.SUBSETS and speaker.isdigit() and chapter.isdigit()
        assert re.fullmatch(rf"{speaker}-{chapter}-\d{{4}}\.flac", flac.name)
        assert (flac.parent / f"{speaker}-{chapter}.trans.txt").is_file()
    assert sorted(transcripts) == sorted(f.stem for f in flacs)
    for text in transcripts.values():
        assert text and text == normalize_transcript(text)
    assert summary.utterances == {k: len(list((out / k).glob("*/*/*.flac"))) for k in common.SUBSETS}
    assert summary.total_seconds - summary.seconds["pool"] == pytest.approx(TINY["minutes"] * 60, rel=0.5)
    assert summary.seconds["pool"] == pytest.approx(TINY["pool_minutes"] * 60, rel=0.6)
    config = json.loads((out / "synth_config.json").read_text())
    assert config["seed"] == 0 and config["speakers"] == 4 and config["synth_version"] == common.SYNTH_VERSION


def test_audio_is_16k_mono_16bit_and_not_silent(tiny_corpus):
    out, _ = tiny_corpus
    for flac in _flacs(out):
        info = sf.info(str(flac))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        audio, _ = sf.read(str(flac), dtype="float32")
        assert common.MIN_SECONDS <= len(audio) / 16000 <= common.MAX_SECONDS
        assert np.sqrt(np.mean(audio ** 2)) > 1e-2  # speech, not silence
        assert np.abs(audio).max() < 0.95  # normalized with headroom, never clipped


def test_subsets_have_disjoint_speakers_listed_in_speakers_txt(tiny_corpus):
    out, summary = tiny_corpus
    by_subset = {k: {p.name for p in (out / k).iterdir()} for k in common.SUBSETS}
    assert all(by_subset.values())
    for i, a in enumerate(common.SUBSETS):
        for b in common.SUBSETS[i + 1:]:
            assert not by_subset[a] & by_subset[b], (a, b)
    rows = [line.split("|") for line in (out / "SPEAKERS.TXT").read_text().splitlines() if not line.startswith(";")]
    listed = {row[0].strip(): row[2].strip() for row in rows}
    assert listed == {spk: k for k, spks in by_subset.items() for spk in spks}
    assert all(row[1].strip() in ("F", "M") and float(row[3]) > 0 for row in rows)
    assert summary.speakers == {k: len(v) for k, v in by_subset.items()}


def test_speakers_read_different_sentences(tiny_corpus):
    out, summary = tiny_corpus
    texts = _transcripts(out)
    assert len(set(texts.values())) == len(texts)
    by_speaker: dict[str, set[str]] = {}
    for utt_id, text in texts.items():
        by_speaker.setdefault(utt_id.split("-")[0], set()).update(text.split())
    assert len(by_speaker) == 6
    assert summary.sentences_read >= len(texts)


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny_corpus, tmp_path):
    out, _ = tiny_corpus
    again = corpus.synthesize_corpus(tmp_path / "again", seed=0, workers=1, **TINY)
    assert not again.reused
    assert _tree(out) == _tree(tmp_path / "again")
    corpus.synthesize_corpus(tmp_path / "other", seed=1, workers=1, **TINY)
    assert set(_transcripts(out).values()).isdisjoint(_transcripts(tmp_path / "other").values())
    assert (out / "SPEAKERS.TXT").read_bytes() != (tmp_path / "other" / "SPEAKERS.TXT").read_bytes()


def test_reuse_refuse_and_force(tmp_path, capsys):
    out = tmp_path / "c"
    args = [str(out), "--minutes", "0.2", "--speakers", "3", "--pool-minutes", "0", "--pool-speakers", "0",
            "--no-progress"]
    sys.path.insert(0, str(TOOLS))
    try:
        import synth_corpus
    finally:
        sys.path.remove(str(TOOLS))
    assert synth_corpus.main(args) == 0
    assert "built corpus" in capsys.readouterr().out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    assert synth_corpus.main(args) == 0  # same settings: reused, nothing rewritten
    assert "reused finished corpus" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    assert synth_corpus.main(args + ["--seed", "3"]) == 2  # different settings: refused
    err = capsys.readouterr().err
    assert "different settings (seed)" in err and "--force" in err
    assert json.loads((out / "synth_config.json").read_text())["seed"] == 0
    with pytest.raises(corpus.SynthError, match="--force"):
        corpus.synthesize_corpus(out, minutes=0.3, speakers=3, progress=False, **NO_POOL)

    summary = corpus.synthesize_corpus(out, minutes=0.2, speakers=3, seed=3, force=True, progress=False,
                                       **NO_POOL)
    assert not summary.reused
    assert json.loads((out / "synth_config.json").read_text())["seed"] == 3
    assert not list(tmp_path.glob(".c.*"))


def test_refuses_a_directory_that_is_not_a_corpus(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(corpus.SynthError, match="not a synthesized corpus"):
            corpus.synthesize_corpus(out, minutes=0.1, speakers=3, force=force, progress=False, **NO_POOL)
    assert (out / "notes.txt").read_text() == "keep me"


def test_interrupted_build_leaves_no_corpus(tmp_path, monkeypatch):
    def fail(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "synth_chapter", fail)
    with pytest.raises(KeyboardInterrupt):
        corpus.synthesize_corpus(tmp_path / "c", minutes=0.1, speakers=3, workers=1, progress=False,
                                 **NO_POOL)
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_and_missing_tools_are_clear_errors(monkeypatch):
    with pytest.raises(corpus.SynthError, match="train speakers"):
        corpus.synthesize_corpus("/nonexistent/x", speakers=4, dev_speakers=2, test_speakers=2)
    with pytest.raises(corpus.SynthError, match="--pool-speakers 0"):
        corpus.synthesize_corpus("/nonexistent/x", pool_minutes=10, pool_speakers=0)
    with pytest.raises(corpus.SynthError, match="unknown engine 'espeak'"):
        corpus.available_voices(["espeak"])
    which = shutil.which
    monkeypatch.setattr(voices.shutil, "which", lambda name: None if name in ("flite", "sox") else which(name))
    with pytest.raises(corpus.SynthError, match="apt-get install sox"):
        corpus.available_voices()
    monkeypatch.setattr(voices.shutil, "which", lambda name: None if name == "flite" else which(name))
    with pytest.raises(corpus.SynthError, match="apt-get install flite"):
        corpus.available_voices(["flite", "festival"])
    inventory = corpus.available_voices()  # not asked for by name: left out with a warning
    assert inventory.engines == ["espeak-ng", "festival"]


def test_every_voice_speaks(tmp_path):
    """Each engine voice (and an espeak-ng voice of each sex) yields a non-silent utterance."""
    inventory = corpus.available_voices()
    pool = corpus.build_sentence_pool()
    render.init_worker(pool, np.arange(len(pool)))
    base = corpus.plan_speakers(0, 3, 1, 1, 60.0, inventory)[0]
    variants = inventory.espeak_variants
    all_voices = [*inventory.voices, corpus.Voice("espeak-ng", f"en-gb+{variants['F'][0]}", "F"),
              corpus.Voice("espeak-ng", f"en-us+{variants['M'][0]}", "M")]
    for i, voice in enumerate(all_voices):
        pitch = 50.0 if voice.engine == "espeak-ng" else voice.f0_hz[0] if voice.f0_hz else 0.0
        speaker = dataclasses.replace(base, voice=voice, pitch=pitch, pitch_std=15.0 if voice.f0_hz else 0.0,
                                      pitch_cents=0.0 if voice.f0_hz else 100.0, chapters=(1000 + i,),
                                      sessions=base.sessions[:1])
        task = render.ChapterTask(0, speaker, 1000 + i, 3.0, (100 * i, 100 * i + 100), str(tmp_path / str(i)))
        result = render.synth_chapter(task)
        assert result.utterances >= 1 and result.failed == 0, (voice, result.errors)
        audio, sr = sf.read(str(next((tmp_path / str(i)).glob("*.flac"))), dtype="float32")
        assert sr == 16000 and np.sqrt(np.mean(audio ** 2)) > 1e-2, voice


def test_chapter_reads_past_its_block_and_a_broken_voice_is_an_error(tmp_path):
    inventory = corpus.available_voices()
    pool = corpus.build_sentence_pool()
    order = np.random.default_rng(0).permutation(len(pool))
    render.init_worker(pool, order)
    speaker = corpus.plan_speakers(0, 3, 1, 1, 60.0, inventory)[0]
    speaker = dataclasses.replace(speaker, chapters=(1, 2), sessions=speaker.sessions[:1] * 2)
    result = render.synth_chapter(render.ChapterTask(0, speaker, 1, 12.0, (0, 1), str(tmp_path / "a")))
    assert result.sentences[0] == order[0] and len(result.sentences) >= 2  # own block of 1, then the pool
    assert len((tmp_path / "a" / f"{speaker.speaker_id}-1.trans.txt").read_text().splitlines()) == result.utterances

    broken = dataclasses.replace(speaker, voice=corpus.Voice("festival", "no_such_voice", "M", (90, 100)), pitch=95.0)
    with pytest.raises(corpus.SynthError, match="festival no_such_voice"):
        render.synth_chapter(render.ChapterTask(0, broken, 2, 12.0, (0, 50), str(tmp_path / "b")))
