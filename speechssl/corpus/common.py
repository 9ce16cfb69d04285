"""Settings every stage of the demo-corpus synthesizer shares, and its error type."""
from __future__ import annotations

SYNTH_VERSION = 2  # bump whenever the same settings would give different audio or text
SAMPLE_RATE = 16000
SUBSETS = ("train", "dev", "test", "pool")
# train: the labeled speakers (fine-tuning, speaker ID); dev / test: held-out speakers (selection, scores);
# pool: the unlabeled pretraining audio, from many more speakers than train, never dev's or test's.
MIN_SECONDS, MAX_SECONDS = 2.0, 15.0  # utterances outside this range are dropped
SNR_DB = (15.0, 35.0)
MIN_WORDS, MAX_WORDS = 4, 20
CHAPTER_SECONDS = 45.0  # a speaker's audio is split into chapters (recording sessions) of at most this
BATCH = 8  # utterances planned and synthesized per engine call (festival pays ~0.3 s start-up per call)
ENGINES = ("espeak-ng", "flite", "festival")


class SynthError(RuntimeError):
    """The corpus cannot be built (missing tool, OUT in the way, an engine failing); says what to do."""
