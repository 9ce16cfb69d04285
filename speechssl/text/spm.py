"""``speechssl spm train WRD --out PREFIX``: a sentencepiece unigram/BPE model as CTC output units.

Trains on the normalized transcripts of a ``.wrd`` file (one utterance per line) and writes
``PREFIX.model`` and ``PREFIX.vocab`` atomically. Fine-tune with ``task.labels=[wrd]
task.spm_model=PREFIX.model``; the pieces are copied into the checkpoint (``task.vocab``), so decoding and
evaluation need no model file.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from speechssl.utils.args import POSITIVE
from speechssl.utils.io import file_in_the_way

DESCRIPTION = """\
Train a sentencepiece model (unigram or BPE) on the transcripts of a manifest's .wrd file, for CTC
fine-tuning on subword units instead of letters. Writes PREFIX.model and PREFIX.vocab (never
overwriting them without --force).

Example:
  speechssl spm train manifests/ls100/train.wrd --out manifests/ls100/spm_unigram300 --vocab-size 300
  speechssl finetune recipes/ctc_base_100h.yaml task.data=manifests/ls100 task.labels=[wrd] \\
      task.spm_model=manifests/ls100/spm_unigram300.model model.w2v_path=wav2vec_small.pt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train"], help="what to do (train a model)")
    p.add_argument("wrd", help="transcript file, one utterance per line (e.g. manifests/x/train.wrd)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=POSITIVE, default=100, help="number of pieces (includes <unk>)")
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--force", action="store_true", help="overwrite existing PREFIX.model / PREFIX.vocab")


def train_spm(wrd: str | Path, out_prefix: str | Path, vocab_size: int = 100, model_type: str = "unigram",
              force: bool = False) -> Path:
    """Train on ``wrd``; return the ``.model`` path. Only ``<unk>`` is reserved (no bos/eos/pad: the CTC
    vocabulary adds fairseq's specials itself); characters are fully covered (coverage 1.0)."""
    import sentencepiece as spm

    wrd, out_prefix = Path(wrd), Path(out_prefix)
    if not wrd.is_file():
        raise FileNotFoundError(f"transcript file not found: {wrd} (a manifest's <split>.wrd)")
    try:
        lines = [line for line in wrd.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{wrd}: not UTF-8 text (transcripts: one utterance per line)") from None
    if not lines:
        raise ValueError(f"{wrd}: no transcript lines")
    targets = [out_prefix.with_name(out_prefix.name + ext) for ext in (".model", ".vocab")]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist; add --force to overwrite")
    blocker = file_in_the_way(out_prefix.parent)
    if blocker is not None:
        raise FileExistsError(f"--out {out_prefix}: {blocker} is a file, not a folder; choose another --out")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_prefix.parent, prefix=".spm.") as tmp:
        prefix = Path(tmp) / "m"
        try:
            spm.SentencePieceTrainer.train(
                input=str(wrd), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
                hard_vocab_limit=False, minloglevel=2)
        except RuntimeError as exc:
            raise ValueError(f"sentencepiece could not train on {wrd} with --vocab-size {vocab_size}: {exc}") from None
        for ext, target in zip((".model", ".vocab"), targets):
            shutil.move(str(prefix.with_name("m" + ext)), str(target.with_name("." + target.name + ".tmp")))
            Path(target.with_name("." + target.name + ".tmp")).replace(target)
    return targets[0]


def run(args: argparse.Namespace) -> int:
    try:
        model = train_spm(args.wrd, args.out, args.vocab_size, args.model_type, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"speechssl spm: {exc}")
        return 2
    from speechssl.text.vocab import Vocabulary

    vocab = Vocabulary.from_spm(model)
    print(f"wrote {model} and {model.with_suffix('.vocab')}: {len(vocab) - 4} pieces ({args.model_type}); "
          f"fine-tune with task.labels=[wrd] task.spm_model={model}")
    return 0
