"""Voices and speakers: what the installed engines offer, and the seeded draw of every speaker.

A speaker is one engine voice (espeak-ng accent+variant, flite or festival voice) with settings drawn
once from the seed: native pitch and rate, a sox ``speed`` factor scaling f0 and formants together
(vocal-tract length; the engine rate compensates), mean SNR (15-35 dB) and level. Each of its chapters is
a recording session with conditions of its own (:class:`Session`): a microphone (band limits, shelves,
one EQ band), an optional small room (sox ``reverb``) and the noise colour. Half the speakers use
espeak-ng with distinct accent+variant pairs (seeded draws without replacement); the rest cycle through the flite/festival voices, spread
apart by Latin-hypercube sampling of pitch, rate and formant factor. Sexes are balanced and interleaved
so every subset gets both; subsets have disjoint speakers.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from speechssl.corpus.common import CHAPTER_SECONDS, ENGINES, SNR_DB, SynthError

# Binary / voice data -> the Debian package that provides it.
PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival", "sox": "sox",
            "kal_diphone": "festvox-kallpc16k", "ked_diphone": "festvox-kdlpc16k",
            "cmu_us_slt_arctic_hts": "festvox-us-slt-hts"}

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-us-nyc", "en-029")
# espeak-ng variants that sound like people (no robots, whispers or croaks), by the sex they model.
ESPEAK_VARIANTS = {
    "M": ("m1", "m2", "m3", "m4", "m6", "m7", "m8", "Andy", "Lee", "Denis", "Diogo", "Hugo", "Michael", "john",
          "iven", "iven2", "paul", "quincy", "robert", "travis", "victor", "antonio", "michel", "gustave",
          "sandro", "klatt", "klatt2", "klatt3", "rob", "ed", "norbert"),
    "F": ("f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "anika", "belinda", "linda", "steph",
          "aunty", "shelby"),
}


@dataclass(frozen=True)
class Voice:
    """One engine voice. ``f0_hz`` is the range of the engine's own f0-mean setting (flite, festival
    diphone voices); voices without one (flite rms, festival HTS) get a sox pitch shift instead."""

    engine: str
    name: str  # espeak-ng "en-gb-scotland+f3"; flite "slt"; festival "kal_diphone"
    sex: str  # "M" | "F"
    f0_hz: Optional[tuple[float, float]] = None


FLITE_VOICES = (Voice("flite", "kal16", "M", (85, 125)), Voice("flite", "awb", "M", (95, 140)),
                Voice("flite", "rms", "M"), Voice("flite", "slt", "F", (145, 215)))
FESTIVAL_VOICES = (Voice("festival", "kal_diphone", "M", (88, 135)), Voice("festival", "ked_diphone", "M", (88, 135)),
                   Voice("festival", "cmu_us_slt_arctic_hts", "F"))


# --------------------------------------------------------------------------------------------------
# The installed engines: availability, voices, versions
# --------------------------------------------------------------------------------------------------


def _not_found(binary: str) -> str:
    return (f"'{binary}' not found on PATH: install the Debian package '{PACKAGES[binary]}' "
            f"(apt-get install {PACKAGES[binary]}, or run tools/setup.sh)")


def _output(cmd: Sequence[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


@dataclass(frozen=True)
class Inventory:
    """What this machine can synthesize with: espeak-ng accents and variants, flite / festival voices."""

    espeak_accents: tuple[str, ...]
    espeak_variants: dict[str, tuple[str, ...]]  # sex -> variant names
    voices: tuple[Voice, ...]  # flite and festival voices
    versions: dict[str, str]  # tool -> version string

    @property
    def engines(self) -> list[str]:
        used = {v.engine for v in self.voices} | ({"espeak-ng"} if self.espeak_accents else set())
        return [e for e in ENGINES if e in used]


def available_voices(engines: Optional[Sequence[str]] = None) -> Inventory:
    """Probe the installed engines. An engine asked for by name must be installed with all its voices;
    with ``engines=None`` a missing engine or festival voice is left out with a warning naming the
    package. sox is always required."""
    explicit = engines is not None
    if shutil.which("sox") is None:
        raise SynthError(_not_found("sox"))
    versions = {"sox": _output(["sox", "--version"]).split("SoX")[-1].strip()}
    accents: tuple[str, ...] = ()
    variants: dict[str, tuple[str, ...]] = {}
    voices: list[Voice] = []

    def missing(message: str) -> None:
        if explicit:
            raise SynthError(message)
        print(f"warning: {message}; building without it", file=sys.stderr)

    for engine in engines or ENGINES:
        if engine not in ENGINES:
            raise SynthError(f"unknown engine '{engine}': choose from {', '.join(ENGINES)}")
        if shutil.which(engine) is None:
            missing(_not_found(engine))
            continue
        if engine == "espeak-ng":
            version = _output(["espeak-ng", "--version"])
            versions[engine] = version.split("Data at")[0].strip()
            data = Path(version.split("Data at:")[-1].strip())
            listing = _output(["espeak-ng", "--voices=en"])
            accents = tuple(a for a in ESPEAK_ACCENTS if re.search(rf"^\s*\d+\s+{re.escape(a)}\s", listing, re.M))
            variants = {sex: tuple(n for n in names if (data / "voices" / "!v" / n).is_file())
                        for sex, names in ESPEAK_VARIANTS.items()}
            if not accents or not all(variants.values()):
                raise SynthError(f"espeak-ng lacks its English voices or variants (data at {data}): "
                                 "reinstall the Debian packages espeak-ng espeak-ng-data")
        elif engine == "flite":
            versions[engine] = next((ln.strip() for ln in _output(["flite", "--version"]).splitlines()
                                     if "version" in ln), "")
            listed = _output(["flite", "-lv"]).split()
            if any(v.name not in listed for v in FLITE_VOICES):
                raise SynthError(f"flite lists the voices {listed[2:]}, not all of "
                                 f"{[v.name for v in FLITE_VOICES]}: reinstall the Debian package 'flite'")
            voices += FLITE_VOICES
        else:
            versions[engine] = _output(["festival", "--version"]).strip()
            listed = _output(["festival", "--batch", "(print (voice.list))"])
            for v in FESTIVAL_VOICES:
                if re.search(rf"\b{v.name}\b", listed):
                    voices.append(v)
                else:
                    missing(f"festival voice {v.name} missing: install the Debian package '{PACKAGES[v.name]}'")
    if not accents and not voices:
        raise SynthError("no TTS engine available: apt-get install espeak-ng flite festival (or run tools/setup.sh)")
    return Inventory(accents, variants, tuple(voices), versions)


# --------------------------------------------------------------------------------------------------
# Speakers: a voice and settings drawn from the seed
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """The recording conditions of one chapter: a microphone (band limits, shelves, one EQ band), an
    optional small room (sox ``reverb``) and the noise colour. Drawn per chapter, so a speaker's chapters
    sound like different recording sessions (speaker ID across sessions cannot lean on the channel)."""

    highpass_hz: float
    lowpass_hz: float
    bass_db: float
    treble_db: float
    eq_hz: float
    eq_db: float
    reverb: Optional[tuple[float, float, float, float]]  # reverberance %, room scale %, pre-delay ms, wet dB
    noise_slope: float  # noise spectrum ~ f^-slope (0 white, 1 pink)

    def describe(self) -> str:
        room = "none" if self.reverb is None else "{:.0f}%/{:.0f}%".format(*self.reverb[:2])
        return (f"band {self.highpass_hz:.0f}-{self.lowpass_hz:.0f}Hz bass {self.bass_db:+.1f} treble "
                f"{self.treble_db:+.1f} eq {self.eq_hz:.0f}Hz {self.eq_db:+.1f}dB reverb {room} "
                f"noise-slope {self.noise_slope:.1f}")


def draw_session(rng: np.random.Generator) -> Session:
    return Session(
        highpass_hz=round(float(rng.uniform(50, 160))),
        lowpass_hz=round(float(rng.uniform(5500, 7800))),
        bass_db=round(float(rng.uniform(-4, 4)), 1),
        treble_db=round(float(rng.uniform(-5, 3)), 1),
        eq_hz=round(float(np.exp(rng.uniform(np.log(400), np.log(3500))))),
        eq_db=round(float(rng.uniform(-5, 5)), 1),
        reverb=(round(float(rng.uniform(10, 45))), round(float(rng.uniform(10, 60))),
                round(float(rng.uniform(0, 10))), round(float(rng.uniform(-8, -3)), 1))
        if rng.random() < 0.5 else None,
        noise_slope=round(float(rng.uniform(0, 1.5)), 2),
    )


def chapter_count(seconds: float) -> int:
    """Chapters (sessions) of a speaker with ``seconds`` of audio: one per CHAPTER_SECONDS, and at least
    3 when there is a minute or more (so speaker ID can train, select and test on different sessions)."""
    return max(1, math.ceil(seconds / CHAPTER_SECONDS), 3 if seconds >= 60.0 else 1)


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: a voice and the fixed settings drawn for it (see the module docstring)."""

    speaker_id: int
    subset: str
    voice: Voice
    pitch: float  # espeak-ng -p (0-99) or target f0 mean in Hz; 0 for voices shifted by pitch_cents
    pitch_std: float  # festival diphone f0 standard deviation (Hz), 0 elsewhere
    pitch_cents: float  # sox pitch shift for voices without a native pitch setting
    rate: float  # speaking-rate factor (1 = engine default)
    word_gap: int  # espeak-ng -g, in 10 ms units
    formant: float  # sox speed factor: scales f0 and formants (vocal-tract length)
    snr_db: float  # mean SNR of the speaker's recordings
    peak_db: float  # recording level (peak, dBFS)
    seconds: float  # audio budget
    chapters: tuple[int, ...]
    sessions: tuple[Session, ...]  # the recording conditions of each chapter

    @property
    def sex(self) -> str:
        return self.voice.sex

    def session(self, chapter_id: int) -> Session:
        return self.sessions[self.chapters.index(chapter_id)]

    def describe(self) -> str:
        v = self.voice
        if v.engine == "espeak-ng":
            engine = f"espeak-ng {v.name} -p {self.pitch:.0f} rate {self.rate:.2f} gap {self.word_gap}"
        elif v.f0_hz is not None:
            std = f" f0-std {self.pitch_std:.0f}" if self.pitch_std else ""
            engine = f"{v.engine} {v.name} f0 {self.pitch:.0f}Hz{std} rate {self.rate:.2f}"
        else:
            engine = f"{v.engine} {v.name} pitch {self.pitch_cents:+.0f}c rate {self.rate:.2f}"
        return f"{engine}; sox speed {self.formant:.3f}; snr {self.snr_db:.0f}dB"


def _stratified(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) values in [0, 1), one in each of n equal strata, in random order (Latin hypercube)."""
    return (rng.permutation(n) + rng.random(n)) / max(n, 1)


def _choose_voices(rng: np.random.Generator, n: int, inventory: Inventory) -> list[Voice]:
    """Half espeak-ng (distinct accent+variant pairs), the rest cycling the other voices; sexes balanced."""
    others = [inventory.voices[i] for i in rng.permutation(len(inventory.voices))]
    n_espeak = 0 if not inventory.espeak_accents else n if not others else (n + 1) // 2
    chosen = [others[i % len(others)] for i in range(n - n_espeak)]
    n_female = min(max(n // 2 - sum(v.sex == "F" for v in chosen), 0), n_espeak)
    # accent+variant pairs per sex in seeded random order: distinct until every pair is used
    pairs = {sex: [f"{a}+{v}" for a in inventory.espeak_accents for v in names]
             for sex, names in inventory.espeak_variants.items()}
    pairs = {sex: [pair[j] for j in rng.permutation(len(pair))] for sex, pair in pairs.items()}
    for i in range(n_espeak):
        sex = "F" if i < n_female else "M"
        k = i if sex == "F" else i - n_female
        chosen.append(Voice("espeak-ng", pairs[sex][k % len(pairs[sex])], sex))
    return chosen


def plan_speakers(seed: int, n_speakers: int, n_dev: int, n_test: int, total_seconds: float,
                  inventory: Inventory, n_pool: int = 0, pool_seconds: float = 0.0) -> list[Speaker]:
    """Draw every speaker's voice and settings from ``seed``; ids 100, 101, ...: train, then dev, then test,
    then the ``n_pool`` speakers of the unlabeled pool (``pool_seconds`` of audio among them).

    All ``n_speakers + n_pool`` speakers are drawn together, so every espeak-ng speaker has an accent+variant
    pair of its own (8 accents x 14 female / 31 male variants): no pool speaker shares a dev or test speaker's
    espeak-ng voice. flite / festival speakers of one engine voice are spread apart in pitch, rate and
    formant factor, and each has its own microphone, room and noise."""
    if n_pool and pool_seconds <= 0:
        raise SynthError(f"{n_pool} pool speakers need pool audio (--pool-minutes > 0)")
    rng = np.random.default_rng([seed, 0x5EED])
    n_labeled = n_speakers
    n_speakers = n_labeled + n_pool
    chosen = _choose_voices(rng, n_speakers, inventory)
    # Latin-hypercube positions of pitch / rate / formant within each group of speakers sharing an engine
    # voice (all espeak-ng speakers form one group), so same-voice speakers are spread apart.
    pos = np.zeros((n_speakers, 3))
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(chosen):
        groups.setdefault(v.engine if v.engine == "espeak-ng" else v.name, []).append(i)
    for members in groups.values():
        pos[members] = np.stack([_stratified(rng, len(members)) for _ in range(3)], axis=1)
    # Interleave sexes so each subset (a contiguous block) gets both.
    order = {sex: [i for i in rng.permutation(n_speakers) if chosen[i].sex == sex] for sex in ("F", "M")}
    first, second = sorted(order.values(), key=len, reverse=True)
    interleaved = [i for pair in zip(first, second + [None] * len(first)) for i in pair if i is not None]
    weights = rng.uniform(0.8, 1.2, n_speakers)
    labeled = [i for rank, i in enumerate(interleaved) if rank < n_labeled]
    pool = [i for rank, i in enumerate(interleaved) if rank >= n_labeled]
    seconds = np.zeros(n_speakers)
    seconds[labeled] = total_seconds * weights[labeled] / weights[labeled].sum()
    if pool:
        seconds[pool] = pool_seconds * weights[pool] / weights[pool].sum()
    n_train = n_labeled - n_dev - n_test
    speakers = []
    for rank, i in enumerate(interleaved):
        v, (u_pitch, u_rate, u_formant) = chosen[i], pos[i]
        female = v.sex == "F"
        if v.engine == "espeak-ng":
            pitch, cents = (38 + 32 * u_pitch if female else 28 + 34 * u_pitch), 0.0
        elif v.f0_hz is not None:
            pitch, cents = v.f0_hz[0] + (v.f0_hz[1] - v.f0_hz[0]) * u_pitch, 0.0
        else:
            pitch, cents = 0.0, -250 + (400 if female else 450) * u_pitch
        lo_f = 0.95 if female else 0.92
        speaker_id = 100 + rank
        n_chapters = chapter_count(seconds[i])
        if n_chapters > 99:  # chapter ids are speaker_id * 100 + 1..99
            raise SynthError(f"{seconds[i] / 3600:.1f} h per speaker is more than 99 chapters: use more --speakers")
        speakers.append(Speaker(
            speaker_id=speaker_id,
            subset="train" if rank < n_train else "dev" if rank < n_train + n_dev else "test" if rank < n_labeled
            else "pool",
            voice=v,
            pitch=round(float(pitch), 1),
            pitch_std=round(float(rng.uniform(10, 24)), 1) if v.engine == "festival" and v.f0_hz else 0.0,
            pitch_cents=round(float(cents), 1),
            rate=round(0.86 + 0.28 * float(u_rate), 3),
            word_gap=int(rng.integers(0, 3)) if v.engine == "espeak-ng" else 0,
            formant=round(lo_f + 0.13 * float(u_formant), 4),
            snr_db=round(float(rng.uniform(SNR_DB[0] + 3, SNR_DB[1] - 3)), 1),
            peak_db=round(float(rng.uniform(-6, -1.5)), 1),
            seconds=float(seconds[i]),
            chapters=tuple(speaker_id * 100 + c + 1 for c in range(n_chapters)),
            sessions=tuple(draw_session(rng) for _ in range(n_chapters)),
        ))
    return sorted(speakers, key=lambda s: s.speaker_id)
