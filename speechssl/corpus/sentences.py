"""The sentence pool: natural English sentences from the Debian text packages, filtered for TTS.

Sources: fortunes / fortunes-min and WordNet's quoted examples (wordnet-base). A sentence is kept when it
has 4-20 words, no digits, symbols, acronyms or abbreviations, and every word of its normalized
transcript is in wamerican's dictionary (about 46 000 distinct are kept). ``passage`` numbers keep the
sentences of one fortune together when the corpus reads them.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from speechssl.corpus.common import MAX_WORDS, MIN_WORDS, SynthError
from speechssl.data.text import normalize_transcript

FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_SKIP = {"art", "ascii-art", "translate-me"}  # pictures, and a file that is not English text
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
DICT_PATH = Path("/usr/share/dict/american-english")

# Text file / directory -> the Debian package that provides it.
TEXT_PACKAGES = {str(FORTUNE_DIR): "fortunes fortunes-min", str(WORDNET_DIR): "wordnet-base",
                 str(DICT_PATH): "wamerican"}

_ALLOWED = re.compile(r"[A-Za-z\s.,;:!?'\"()\-]+")
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+[\"')\]]*(?=\s|$)|$)", re.S)
_ABBREVIATION = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Rev|Gen|Col|Capt|Lt|Sgt|Gov|Sen|Rep|Mt|Ft|Messrs|Esq|Inc|Ltd|Co|"
    r"Corp|Bros|Dept|Univ|Vol|No|Jan|Feb|Apr|Aug|Sept|Oct|Nov|Dec)\.|\b(?:etc|vs|cf|ie|eg|approx)\b",
    re.I,
)
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")  # TTS engines spell these out; the transcript would not
_ATTRIBUTION = re.compile(r"^\s*--")
_ONE_LETTER_WORDS = {"a", "i", "o"}


@dataclass(frozen=True)
class SentencePool:
    """Distinct sentences in source order; ``passage[i]`` numbers the fortune (or example) sentence i
    comes from, so consecutive sentences of one passage can be kept together."""

    text: tuple[str, ...]  # what the engine reads (original punctuation)
    transcript: tuple[str, ...]  # normalized (upper-case A-Z and ')
    passage: np.ndarray  # (n,) int

    def __len__(self) -> int:
        return len(self.text)


def _clean_sentence(raw: str, vocabulary: set[str]) -> Optional[tuple[str, str]]:
    """(engine text, transcript) when ``raw`` is a usable sentence, else None."""
    text = " ".join(raw.split()).lstrip("-:;,.) ")
    if not text or not _ALLOWED.fullmatch(text) or _ABBREVIATION.search(text) or _ACRONYM.search(text):
        return None
    transcript = normalize_transcript(text)
    words = transcript.lower().split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    if any(w not in vocabulary or (len(w) == 1 and w not in _ONE_LETTER_WORDS) for w in words):
        return None
    if text[-1] not in ".!?\"')":
        text += "."
    return text[0].upper() + text[1:], transcript


def _require(path: Path) -> Path:
    if not path.exists():
        raise SynthError(f"{path} not found: install the Debian package(s) '{TEXT_PACKAGES[str(path)]}' "
                         f"(apt-get install {TEXT_PACKAGES[str(path)]}, or run tools/setup.sh)")
    return path


def text_source_files() -> list[Path]:
    """The fortune and WordNet files sentences are drawn from, in a fixed order."""
    fortunes = sorted(p for p in _require(FORTUNE_DIR).iterdir()
                      if p.is_file() and not p.suffix and p.name not in FORTUNE_SKIP)
    if not fortunes:
        raise SynthError(f"no fortune files in {FORTUNE_DIR}: apt-get install {TEXT_PACKAGES[str(FORTUNE_DIR)]}")
    wordnet = [_require(WORDNET_DIR) / name for name in WORDNET_FILES]
    return fortunes + [p for p in wordnet if p.is_file()]


def build_sentence_pool() -> SentencePool:
    """Filter and deduplicate the sentences of the text packages (about 1.5 s; cached per process
    while the files are unchanged)."""
    sources = tuple(text_source_files())
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (*sources, _require(DICT_PATH)))
    return _build_sentence_pool(sources, stamp)


@functools.lru_cache(maxsize=2)
def _build_sentence_pool(sources: tuple[Path, ...], stamp: tuple) -> SentencePool:
    vocabulary = {w.strip().lower() for w in _require(DICT_PATH).read_text("utf-8", "replace").split()}
    seen: set[str] = set()
    texts, transcripts, passages = [], [], []
    n_passages = 0

    def add(raw: str) -> bool:
        cleaned = _clean_sentence(raw, vocabulary)
        if cleaned is None or cleaned[1] in seen:
            return False
        seen.add(cleaned[1])
        texts.append(cleaned[0])
        transcripts.append(cleaned[1])
        passages.append(n_passages)
        return True

    for path in sources:
        content = path.read_bytes().decode("utf-8", "replace")
        if path.parent == WORDNET_DIR:  # glosses: definition; "example one"; "example two"
            for example in re.findall(r'"([^"\n]+)"', content):
                n_passages += add(example)
            continue
        for fortune in re.split(r"^%\s*$", content, flags=re.M):
            body = " ".join(line for line in fortune.splitlines() if not _ATTRIBUTION.match(line))
            run = 0
            for match in _SENTENCE.finditer(body):
                if add(match.group(0)):
                    run += 1
                elif run:  # an unusable sentence breaks the passage
                    n_passages, run = n_passages + 1, 0
            n_passages += run > 0
    return SentencePool(tuple(texts), tuple(transcripts), np.asarray(passages, dtype=np.int64))


def sources_sha256(files: Sequence[Path]) -> str:
    """One hash of the names and contents of the text source files (part of the corpus config)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
