"""Shared helpers (no tests) for the CTC / decoding / evaluation tests: a learnable toy ASR corpus.

Every letter is a tone of its own pitch (0.16 s, 8 frames of 20 ms), words are separated by 0.12 s of
silence: a tiny model learns the mapping within a few hundred CPU updates, so the tests can check
that fine-tuning truly learns.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import soundfile as sf
import yaml

SR = 16000
TONES = {"A": 300.0, "B": 700.0, "C": 1300.0, "D": 2300.0}
SENTENCES = ["AB CAD", "BAD DC", "CAB", "DAB BC", "AC BD", "BCD A"]


def random_sentences(n: int, seed: int) -> list[str]:
    """``n`` random sentences of 1-3 words of 1-4 letters."""
    rng = np.random.default_rng(seed)
    letters = list(TONES)
    return [" ".join("".join(rng.choice(letters, size=rng.integers(1, 5))) for _ in range(rng.integers(1, 4)))
            for _ in range(n)]


def synth(words: str, rng: np.random.Generator, letter_s: float = 0.16, gap_s: float = 0.12) -> np.ndarray:
    parts = [np.zeros(int(gap_s * SR))]
    for word in words.split():
        for ch in word:
            t = np.arange(int(letter_s * SR)) / SR
            parts.append(0.4 * np.sin(2 * np.pi * TONES[ch] * t + rng.uniform(0, 6.28)))
        parts.append(np.zeros(int(gap_s * SR)))
    x = np.concatenate(parts)
    return (x + 0.01 * rng.standard_normal(len(x))).astype(np.float32)


def write_split(root: Path, split: str, sentences: Sequence[str], seed: int, labels: bool = True,
                speakers: Optional[Sequence[str]] = None) -> None:
    from speechssl.data.text import words_to_letters

    rng = np.random.default_rng(seed)
    audio = root / "audio" / split
    audio.mkdir(parents=True, exist_ok=True)
    lines = [str(audio)]
    for i, s in enumerate(sentences):
        x = synth(s, rng)
        sf.write(audio / f"u{i:03d}.flac", x, SR)
        lines.append(f"u{i:03d}.flac\t{len(x)}")
    (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    if labels:
        (root / f"{split}.wrd").write_text("".join(s + "\n" for s in sentences))
        (root / f"{split}.ltr").write_text("".join(words_to_letters(s) + "\n" for s in sentences))
    if speakers is not None:
        (root / f"{split}.spk").write_text("".join(f"{spk}\n" for spk in speakers))


def make_tone_corpus(root: Path, num_train: int = 32) -> Path:
    """Manifest folder: ``num_train`` random training sentences; valid and test = :data:`SENTENCES`
    (unseen sentences, other noise); test has speakers s1/s2."""
    root.mkdir(parents=True, exist_ok=True)
    train = random_sentences(num_train, 0)
    write_split(root, "train", train, 0)
    write_split(root, "valid", SENTENCES, 1)
    write_split(root, "test", SENTENCES, 2, speakers=["s1", "s2"] * (len(SENTENCES) // 2))
    counts: dict[str, int] = {}
    for s in train:
        for ch in s.replace(" ", "|") + "|":
            counts[ch] = counts.get(ch, 0) + 1
    (root / "dict.ltr.txt").write_text("".join(f"{c} {n}\n" for c, n in sorted(counts.items(), key=lambda x: -x[1])))
    return root


def tiny_ctc_recipe(path: Path, data: Path, save_dir: Path, **sections: dict[str, Any]) -> Path:
    """A CTC recipe with the 70k-parameter test model, trained from scratch unless model.w2v_path is set."""
    from speechssl.config import _to_plain
    from speechssl.models import wav2vec2_tiny_config

    model = _to_plain(dataclasses.asdict(wav2vec2_tiny_config()))
    model.update(mask_prob=0.0, mask_channel_prob=0.0, apply_mask=False, encoder_layerdrop=0.0, dropout=0.0,
                 attention_dropout=0.0, dropout_input=0.0, feature_grad_mult=1.0, freeze_finetune_updates=0)
    rec: dict[str, Any] = {
        "base": "ctc_base_10m.yaml",
        "model": model,
        "common": {"fp16": False, "log_interval": 25, "log_format": "simple", "seed": 1},
        "task": {"data": str(data)},
        "dataset": {"max_tokens": 200000, "num_workers": 0, "validate_interval_updates": 0,
                    "validate_interval": 1000},
        "distributed_training": {"distributed_world_size": 1},
        "optimization": {"max_update": 200, "lr": 3e-3, "update_freq": 1},
        "lr_scheduler": {"phase_ratio": [0.1, 0.6, 0.3]},
        "checkpoint": {"save_dir": str(save_dir), "save_interval_updates": 0, "save_interval": 1000,
                       "keep_interval_updates": 1},
    }
    for sec, body in sections.items():
        rec.setdefault(sec, {}).update(body)
    path.write_text(yaml.safe_dump(rec))
    return path
