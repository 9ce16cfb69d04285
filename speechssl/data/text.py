"""The one transcript normalization speechssl uses, and letter (``.ltr``) targets.

Normalization (as LibriSpeech's transcripts): Unicode compatibility-decomposed and accents dropped
(``café`` -> ``CAFE``), upper case, only the letters A-Z and the apostrophe kept; every other character
(digits, punctuation, hyphens) becomes a word break; apostrophes that do not touch a letter are dropped;
runs of whitespace collapse to one space.

Letters: the characters of each word separated by spaces with ``|`` after every word, as fairseq's
``libri_labels.py`` writes them: ``"HI YOU"`` -> ``"H I | Y O U |"``.
"""

from __future__ import annotations

import re
import unicodedata

WORD_BOUNDARY = "|"
_NOT_KEPT = re.compile(r"[^A-Z']+")
_LONE_APOSTROPHES = re.compile(r"(?<![A-Z])'+(?![A-Z])")


def normalize_transcript(text: str) -> str:
    """Normalize one transcript line to upper-case words of A-Z and apostrophes."""
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_text = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    upper = ascii_text.upper().replace("\u2019", "'")
    kept = _NOT_KEPT.sub(" ", upper)
    kept = _LONE_APOSTROPHES.sub(" ", kept)
    return " ".join(kept.split())


def words_to_letters(words: str) -> str:
    """``"HI YOU"`` -> ``"H I | Y O U |"`` (empty string for an empty transcript)."""
    return " ".join(" ".join(word) + f" {WORD_BOUNDARY}" for word in words.split())


def letters_to_words(letters: str) -> str:
    """Inverse of :func:`words_to_letters`: ``"H I | Y O U |"`` -> ``"HI YOU"``."""
    return " ".join("".join(letters.split()).replace(WORD_BOUNDARY, " ").split())
