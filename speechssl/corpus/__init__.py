"""Offline demo corpus: a LibriSpeech-layout speech corpus synthesized with Debian TTS engines.

The project cannot download LibriSpeech; this builds a stand-in the whole pipeline can learn from::

    OUT/{train,dev,test,pool}/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac   16 kHz mono 16-bit
    OUT/{train,dev,test,pool}/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt      "<utt-id> TRANSCRIPT"

train (labeled speakers: fine-tuning, speaker ID), dev and test (held-out speakers: selection, scores)
and pool (the unlabeled pretraining audio: many more speakers of its own, default 5.5 h from 160; its
transcripts exist but the demo never reads them).
    OUT/SPEAKERS.TXT        id | sex | subset | minutes | voice (engine and every setting)
    OUT/CHAPTERS.TXT        chapter | speaker | minutes | subset | session (microphone, room, noise colour)
    OUT/synth_summary.json  counts and seconds per subset, dropped utterances, sentence pool size
    OUT/synth_config.json   settings, seed, versions of generator, tools and text sources (written last)

Speakers: one engine voice (espeak-ng accent+variant, flite or festival voice) with settings drawn once
from the seed: native pitch and rate, a sox ``speed`` factor scaling f0 and formants together
(vocal-tract length; the engine rate compensates), a microphone (band limits, shelves, one EQ band), an
optional small room (sox ``reverb``), noise colour, mean SNR (15-35 dB) and level. Half the speakers use
espeak-ng with distinct accent+variant pairs; the rest cycle through the flite/festival voices, spread
apart by Latin-hypercube sampling of pitch, rate and formant factor. Sexes are balanced and interleaved
so every subset gets both; subsets have disjoint speakers. Pitch and rate vary a few percent per
utterance, SNR per chapter (recording session) and utterance.

Text: sentences of fortunes / fortunes-min and WordNet's quoted examples (wordnet-base) with 4-20 words,
no digits, symbols, acronyms or abbreviations, every word of the normalized transcript in wamerican's
dictionary (about 46 000 distinct). An utterance is consecutive sentences (a fortune's stay together)
aimed at 3-14 s; each chapter reads its own block of the seeded order, so no sentence repeats until the
pool runs out. The engine reads the original punctuation; the transcript is
:func:`~speechssl.data.text.normalize_transcript` of it.

Same seed and settings => byte-identical corpus whatever the number of workers (the engines are
deterministic, sox runs with ``-R``, noise is numpy with per-chapter seeds). The build goes to a
temporary directory beside OUT renamed at the end: an interrupted run never looks finished.

Modules, in pipeline order:

- :mod:`~speechssl.corpus.common`     shared settings (sample rate, durations, SNR, ``SYNTH_VERSION``), ``SynthError``
- :mod:`~speechssl.corpus.sentences`  the sentence pool from the Debian text packages
- :mod:`~speechssl.corpus.voices`     installed engines and voices (``available_voices``), speakers (``plan_speakers``)
- :mod:`~speechssl.corpus.render`     one chapter: engine and sox commands, noise, level, FLAC + transcript
- :mod:`~speechssl.corpus.build`      the whole corpus: chapters on worker processes, metadata, reuse
- :mod:`~speechssl.corpus.cli`        ``speechssl corpus`` (``DESCRIPTION``, ``add_arguments``, ``run``)
"""
from speechssl.corpus.build import CorpusSummary, corpus_config, synthesize_corpus
from speechssl.corpus.cli import DESCRIPTION, add_arguments, run
from speechssl.corpus.common import ENGINES, SAMPLE_RATE, SUBSETS, SYNTH_VERSION, SynthError
from speechssl.corpus.sentences import SentencePool, build_sentence_pool
from speechssl.corpus.voices import Inventory, Speaker, Voice, available_voices, plan_speakers

__all__ = [
    "CorpusSummary", "DESCRIPTION", "ENGINES", "Inventory", "SAMPLE_RATE", "SUBSETS", "SYNTH_VERSION",
    "SentencePool", "Speaker", "SynthError", "Voice", "add_arguments", "available_voices",
    "build_sentence_pool", "corpus_config", "plan_speakers", "run", "synthesize_corpus",
]
