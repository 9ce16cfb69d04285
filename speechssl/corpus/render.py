"""One chapter (a speaker's recording session): plan utterances, run the TTS engine and sox, add noise,
set the level, write the FLACs and the ``.trans.txt``.

An utterance is consecutive sentences of the pool aimed at 3-14 s; the engine reads the original
punctuation, the transcript is the normalized text. Pitch and rate vary a few percent per utterance,
SNR per chapter and utterance. Deterministic: the engines are, sox runs with ``-R`` and the noise is
numpy with per-chapter seeds, so a chapter does not depend on the process that renders it.
"""
from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from speechssl.corpus.common import BATCH, MAX_SECONDS, MIN_SECONDS, SAMPLE_RATE, SNR_DB, SynthError
from speechssl.corpus.sentences import SentencePool
from speechssl.corpus.voices import Session, Speaker
from speechssl.utils.io import atomic_write_text

_POOL: Optional[SentencePool] = None  # set once per worker process by init_worker
_ORDER: Optional[np.ndarray] = None  # the seeded reading order of the pool


def init_worker(pool: SentencePool, order: np.ndarray) -> None:
    """Give this process the pool and reading order :func:`synth_chapter` reads (once per worker)."""
    global _POOL, _ORDER
    _POOL, _ORDER = pool, order


@dataclass(frozen=True)
class ChapterTask:
    """One chapter to render: picklable, so it can go to a worker process."""

    seed: int
    speaker: Speaker
    chapter_id: int
    seconds: float  # audio budget of this chapter
    block: tuple[int, int]  # this chapter's own slice of the reading order
    out_dir: str  # the chapter directory


@dataclass
class ChapterResult:
    """What rendering one chapter produced."""

    speaker_id: int
    chapter_id: int
    seconds: float = 0.0
    utterances: int = 0
    failed: int = 0  # the engine or sox failed
    out_of_range: int = 0  # outside MIN_SECONDS..MAX_SECONDS
    sentences: list[int] = field(default_factory=list)  # pool indices read
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Utterance:
    sentences: tuple[int, ...]
    rate: float  # per-utterance jitter factors around the speaker's settings
    pitch: float
    cents: float
    pad: tuple[float, float]  # seconds of room tone before / after the speech
    snr_db: float
    level_db: float
    noise_seed: int


def _words(index: int) -> int:
    return _POOL.transcript[index].count(" ") + 1


def _plan_batch(rng: np.random.Generator, reading: np.ndarray, pos: int, remaining: float, wps: float,
                speaker: Speaker, chapter_snr: float) -> tuple[list[_Utterance], int]:
    """Up to BATCH utterances of consecutive sentences ``reading[pos:]``, each aimed at a 3-14 s duration
    drawn here (``wps``: the speaker's words per second so far). Returns them and the next position."""
    pad_mean, batch, planned = 0.8, [], 0.0
    while len(batch) < BATCH and planned < remaining:
        target = min(rng.uniform(3.0, 14.0), max(remaining - planned, 3.0))
        sentences, estimate = [int(reading[pos])], pad_mean + _words(reading[pos]) / wps
        pos += 1
        while estimate + _words(reading[pos]) / wps <= target:
            estimate += _words(reading[pos]) / wps
            sentences.append(int(reading[pos]))
            pos += 1
        planned += estimate
        batch.append(_Utterance(
            sentences=tuple(sentences),
            rate=float(np.exp(rng.normal(0, 0.04))),
            pitch=float(np.exp(rng.normal(0, 0.03))),
            cents=float(rng.normal(0, 25)),
            pad=(float(rng.uniform(0.15, 0.6)), float(rng.uniform(0.2, 0.7))),
            snr_db=float(np.clip(chapter_snr + rng.normal(0, 1.5), *SNR_DB)),
            level_db=float(min(speaker.peak_db + rng.normal(0, 0.7), -1.0)),
            noise_seed=int(rng.integers(2**63)),
        ))
    return batch, pos


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _engine_commands(speaker: Speaker, utts: Sequence[_Utterance], work: Path) -> list[list[str]]:
    """The commands that write ``work/<i>.wav`` for each utterance (festival: one batch script)."""
    v, commands = speaker.voice, []
    for i, u in enumerate(utts):
        (work / f"{i}.txt").write_text(" ".join(_POOL.text[s] for s in u.sentences) + "\n", encoding="utf-8")
    rates = [speaker.rate * u.rate / speaker.formant for u in utts]  # sox speed F speeds up by F: compensate
    if v.engine == "espeak-ng":
        for i, u in enumerate(utts):
            pitch = int(np.clip(round(speaker.pitch + 50 * (u.pitch - 1)), 0, 99))
            commands.append(["espeak-ng", "-v", v.name, "-p", str(pitch), "-s", str(round(165 * rates[i])),
                             "-g", str(speaker.word_gap), "-w", str(work / f"{i}.wav"), "-f", str(work / f"{i}.txt")])
    elif v.engine == "flite":
        for i, u in enumerate(utts):
            cmd = ["flite", "-voice", v.name, "--setf", f"duration_stretch={1 / rates[i]:.4f}"]
            if v.f0_hz is not None:
                cmd += ["--setf", f"int_f0_target_mean={speaker.pitch * u.pitch:.2f}"]
            commands.append(cmd + ["-f", str(work / f"{i}.txt"), "-o", str(work / f"{i}.wav")])
    else:
        lines = [f"(voice_{v.name})"]
        for i, u in enumerate(utts):
            if v.f0_hz is None:  # HTS: rate through hts_engine's -r; pitch through sox
                rate = f"(list '(\"-r\" {rates[i]:.4f}))"
                lines.append(f"(set! hts_engine_params (append {v.name}::hts_engine_params {rate}))")
            else:
                lines.append(f"(Parameter.set 'Duration_Stretch {1.1 / rates[i]:.4f})")
                lines.append(f"(set! int_lr_params '((target_f0_mean {speaker.pitch * u.pitch:.2f}) "
                             f"(target_f0_std {speaker.pitch_std:.1f}) (model_f0_mean 170) (model_f0_std 34)))")
            text = (work / f"{i}.txt").read_text(encoding="utf-8").strip()
            lines.append(f"(unwind-protect (utt.save.wave (utt.synth (Utterance Text {_scheme_string(text)})) "
                         f"{_scheme_string(str(work / f'{i}.wav'))} 'riff) nil)")
        (work / "batch.scm").write_text("\n".join(lines) + "\n", encoding="utf-8")
        commands.append(["festival", "--batch", str(work / "batch.scm")])
    return commands


def _sox_command(speaker: Speaker, session: Session, u: _Utterance, wav: Path) -> list[str]:
    """Voice transform, the session's room and microphone, resampling to 16 kHz mono float32 on stdout."""
    effects = ["gain", "-10", "speed", f"{speaker.formant:.4f}"]
    if speaker.voice.f0_hz is None and speaker.voice.engine != "espeak-ng":
        effects += ["pitch", f"{speaker.pitch_cents + u.cents:.1f}"]
    # to 16 kHz before the room and microphone: ``speed`` leaves the stream at engine rate x factor,
    # below the microphone's low-pass cut-off for some voices and factors
    effects += ["rate", "-v", str(SAMPLE_RATE)]
    if session.reverb is not None:
        reverberance, room, predelay, wet = session.reverb
        effects += ["reverb", f"{reverberance:g}", "50", f"{room:g}", "0", f"{predelay:g}", f"{wet:g}"]
    effects += ["highpass", f"{session.highpass_hz:g}", "lowpass", f"{session.lowpass_hz:g}",
                "bass", f"{session.bass_db:g}", "treble", f"{session.treble_db:g}",
                "equalizer", f"{session.eq_hz:g}", "1.0o", f"{session.eq_db:g}", "channels", "1"]
    return ["sox", "-R", "-D", "-V1", str(wav), "-t", "f32", "-r", str(SAMPLE_RATE), "-c", "1", "-", *effects]


def _colored_noise(rng: np.random.Generator, n: int, slope: float) -> np.ndarray:
    """(n,) unit-variance noise with power spectrum ~ f^-slope (flat below 50 Hz)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 50.0)
    noise = np.fft.irfft(spectrum * (freqs / 1000.0) ** (-slope / 2), n)
    return noise / (noise.std() + 1e-12)


def _finish(speech: np.ndarray, session: Session, u: _Utterance) -> Optional[np.ndarray]:
    """Trim the engine's silence, pad with room tone, add noise at the utterance SNR, set the level.

    speech: (time,) finite, not silent, at 16 kHz. Returns (time,) float in [-1, 1), or None when the
    result would be outside MIN_SECONDS..MAX_SECONDS.
    """
    peak = np.abs(speech).max()
    loud = np.flatnonzero(np.abs(speech) > peak * 10 ** (-45 / 20))
    margin = SAMPLE_RATE // 20
    speech = speech[max(loud[0] - margin, 0): loud[-1] + margin] / peak
    before, after = (round(p * SAMPLE_RATE) for p in u.pad)
    if not MIN_SECONDS <= (before + len(speech) + after) / SAMPLE_RATE <= MAX_SECONDS:
        return None
    frames = speech[: len(speech) // 320 * 320].reshape(-1, 320)
    energy = (frames ** 2).mean(axis=1)
    speech_power = energy[energy > energy.max() * 1e-3].mean()  # active 20 ms frames only
    signal = np.concatenate([np.zeros(before), speech, np.zeros(after)])
    noise = _colored_noise(np.random.default_rng(u.noise_seed), len(signal), session.noise_slope)
    signal = signal + noise * np.sqrt(speech_power / 10 ** (u.snr_db / 10))
    return signal * (10 ** (u.level_db / 20) / np.abs(signal).max())


def synth_chapter(task: ChapterTask) -> ChapterResult:
    """Synthesize one chapter until its audio budget is filled; writes FLACs and the .trans.txt."""
    import soundfile as sf

    speaker, out = task.speaker, Path(task.out_dir)
    session = speaker.session(task.chapter_id)
    rng = np.random.default_rng([task.seed, speaker.speaker_id, task.chapter_id])
    # The chapter's own block of the reading order, then (pool exhausted) the pool in a chapter-specific order.
    fallback = np.random.default_rng([task.seed, speaker.speaker_id, task.chapter_id, 1]).permutation(len(_POOL))
    reading, pos = np.concatenate([_ORDER[task.block[0]:task.block[1]], fallback]), 0
    chapter_snr = float(np.clip(speaker.snr_db + rng.normal(0, 2.0), *SNR_DB))
    result = ChapterResult(speaker.speaker_id, task.chapter_id)
    lines: list[str] = []
    words_read, speech_seconds = 0, 0.0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="speechssl-synth-") as tmp:
        work = Path(tmp)
        # Stop within about a second of the budget (the last utterance is aimed at what is left).
        while result.utterances == 0 or task.seconds - result.seconds > MIN_SECONDS / 2:
            wps = words_read / speech_seconds if speech_seconds > 5 else 2.6 * speaker.rate
            utts, pos = _plan_batch(rng, reading, pos, task.seconds - result.seconds, wps, speaker, chapter_snr)
            for wav in work.glob("*.wav"):
                wav.unlink()
            for cmd in _engine_commands(speaker, utts, work):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    result.errors.append(f"{' '.join(cmd[:3])}: exit {proc.returncode}: {proc.stderr[-300:].strip()}")
            for i, u in enumerate(utts):
                if result.utterances and task.seconds - result.seconds <= MIN_SECONDS / 2:
                    break  # budget filled: the rest of the batch is not needed
                wav = work / f"{i}.wav"
                proc = None
                if wav.is_file() and wav.stat().st_size > 1000:
                    proc = subprocess.run(_sox_command(speaker, session, u, wav), capture_output=True, timeout=600)
                if proc is None or proc.returncode != 0 or not proc.stdout:
                    result.failed += 1
                    if proc is not None:
                        result.errors.append(f"sox: {proc.stderr.decode(errors='replace').strip()[-300:]}")
                    continue
                speech = np.frombuffer(proc.stdout, dtype=np.float32).astype(np.float64)
                if not np.isfinite(speech).all() or np.abs(speech).max() < 1e-4:
                    result.failed += 1
                    continue
                audio = _finish(speech, session, u)
                if audio is None:
                    result.out_of_range += 1
                    continue
                utt_id = f"{speaker.speaker_id}-{task.chapter_id}-{result.utterances:04d}"
                sf.write(str(out / f"{utt_id}.flac"), audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
                transcript = " ".join(_POOL.transcript[s] for s in u.sentences)
                lines.append(f"{utt_id} {transcript}")
                seconds = len(audio) / SAMPLE_RATE
                result.utterances += 1
                result.seconds += seconds
                result.sentences += u.sentences
                words_read += transcript.count(" ") + 1
                speech_seconds += seconds - sum(u.pad)
            dropped = result.failed + result.out_of_range
            if dropped >= 2 * (BATCH + result.utterances):  # a broken voice, not the odd bad sentence
                raise SynthError(f"voice '{speaker.voice.engine} {speaker.voice.name}' gave {result.utterances} "
                                 f"usable utterances and {result.failed} failures, {result.out_of_range} out of "
                                 f"range: {'; '.join(result.errors[-2:]) or 'no error output'}")
    if lines:
        atomic_write_text(out / f"{speaker.speaker_id}-{task.chapter_id}.trans.txt", "\n".join(lines) + "\n")
    else:
        out.rmdir()
    return result
