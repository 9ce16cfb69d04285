"""``speechssl import`` and ``speechssl export``: thin command layers over the per-toolkit modules."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

from speechssl.utils.args import NON_NEGATIVE, POSITIVE

IMPORT_DESCRIPTION = """\
Convert another toolkit's wav2vec 2.0 / HuBERT checkpoint (pretraining or CTC fine-tuned) into a
speechssl checkpoint CKPT. CKPT is an ordinary speechssl checkpoint: fine-tune from it
(model.w2v_path=CKPT), evaluate it, extract features from it, export it.

  fairseq     an original fairseq .pt (read with a restricted unpickler: tensors and configuration
              only, no fairseq needed, no code run). Fine-tuned (CTC) checkpoints also need --dict,
              the dict.ltr.txt they were trained with.
  hf          a local transformers folder (config.json + model.safetensors / pytorch_model.bin;
              vocab.json for CTC models). Hub names are not fetched.
  torchaudio  a folder written by 'speechssl export --to torchaudio' (config.json + model.pt)
  fairseq2    a fairseq2 wav2vec2 asset card (.yaml) or a folder holding one and its checkpoint

Parameters the source does not have (e.g. the quantizer of a transformers Wav2Vec2Model) keep their
fresh initialisation and are listed.

Examples:
  speechssl import wav2vec_small.pt --from fairseq --out w2v_base.pt
  speechssl import wav2vec_small_960h.pt --from fairseq --dict dict.ltr.txt --out w2v_base_960h.pt
  speechssl import ./wav2vec2-base-960h --from hf --out w2v_base_960h.pt
  speechssl finetune recipes/ctc_base_10h.yaml model.w2v_path=w2v_base.pt
"""

EXPORT_DESCRIPTION = """\
Write a speechssl checkpoint (pretraining or CTC fine-tuned) in another toolkit's format into the
folder DIR (written beside DIR and renamed into place; an existing DIR needs --force).

  hf          config.json + model.safetensors: transformers' Wav2Vec2ForPreTraining, HubertModel,
              Wav2Vec2ForCTC / HubertForCTC (+ vocab.json, tokenizer and feature-extractor files, so
              Wav2Vec2Processor.from_pretrained(DIR) decodes the output)
  torchaudio  config.json (torchaudio.models.wav2vec2_model kwargs) + model.pt (state dict)
  fairseq2    model.pt + an asset card <DIR name>.yaml: FAIRSEQ2_USER_ASSET_DIR=DIR, then
              get_wav2vec2_model_hub().load_model('<DIR name>') (wav2vec 2.0 pretraining models)
  onnx        model.onnx (inputs source (batch, samples), lengths (batch,); outputs hidden,
              frame_lengths, and logits for CTC; dynamic batch and length; no dropout, LayerDrop or
              masking in the graph) + config.json

Examples:
  speechssl export runs/base/checkpoint_best.pt --to hf --out export/w2v_base_hf
  speechssl export runs/ctc/checkpoint_best.pt --to onnx --out export/ctc_onnx
"""

EXTRACT_DESCRIPTION = """\
Per-utterance features of Transformer layers of CKPT's encoder for the utterances of
MANIFEST_DIR/<split>.tsv, written to OUT as sharded, memory-mappable float32 arrays
(<split>_<i>_<n>.npy with every utterance's frames x (layers x dim), .len, .json). Layers are
1-based outputs of the Transformer layers ('all' = 1..N). CKPT: any speechssl checkpoint
(pretraining, CTC fine-tuned, or one made by 'speechssl import').

Shards split the manifest lines as 'speechssl features' does: without --shard every shard is done in
turn; --shard i does only shard i (run one process per shard, or torchrun). Finished shards made the
same way are skipped; --force redoes them.

Examples:
  speechssl import wav2vec_small.pt --from fairseq --out w2v_base.pt
  speechssl extract w2v_base.pt manifests/ls --split dev-clean --layers all --out feats/w2v_base
  speechssl extract w2v_base.pt manifests/ls --split train --layers 6,9,12 --nshard 4 --shard 0 --out feats/l6

Python: LayerFeatures.open('feats/w2v_base', 'dev-clean').utterance(0) -> (layers, frames, dim)
"""


IMPORT_FORMATS = ("fairseq", "hf", "torchaudio", "fairseq2")
EXPORT_FORMATS = ("hf", "fairseq2", "torchaudio", "onnx")


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint file or folder to convert")
    p.add_argument("--from", dest="source_format", required=True, choices=IMPORT_FORMATS, help="format of SRC")
    p.add_argument("--out", required=True, help="speechssl checkpoint to write (.pt)")
    p.add_argument("--dict", default=None, help="fairseq CTC checkpoints: the dict.ltr.txt of their training")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def run_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from speechssl.interop.common import InteropError, check_and_build, refuse_existing, save_imported
    from speechssl.interop.unpickle import UnsafeCheckpointError

    from speechssl.interop.identify import import_source_problem

    try:
        refuse_existing(Path(args.out), args.force)
        problem = import_source_problem(args.src, args.source_format)
        if problem:
            raise InteropError(problem)
        notes: list[str] = []
        num_updates = 0
        if args.source_format == "fairseq":
            from speechssl.interop.fairseq import import_fairseq

            state, cfg, num_updates = import_fairseq(args.src, args.dict)
        elif args.source_format == "hf":
            from speechssl.interop.hf import import_hf

            state, cfg, notes = import_hf(args.src)
        elif args.source_format == "torchaudio":
            from speechssl.interop.torchaudio_io import import_torchaudio

            state, cfg, notes = import_torchaudio(args.src)
        else:
            from speechssl.interop.fairseq2 import import_fairseq2

            state, cfg, num_updates = import_fairseq2(args.src)
        check_and_build(state, cfg, args.src)
        save_imported(args.out, state, cfg, args.source_format, args.src, args.force, num_updates)
    except (InteropError, UnsafeCheckpointError, FileNotFoundError, RuntimeError) as exc:
        print(f"speechssl import: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"speechssl import --from {args.source_format} needs the '{exc.name}' package: pip install {exc.name}",
              file=sys.stderr)
        return 1
    m = cfg.model
    kind = f"{m.name} CTC ({len(cfg.task.vocab)} symbols)" if cfg.task.vocab else f"{m.name} pretraining"
    print(f"imported {kind}: {m.encoder_layers} layers x {m.encoder_embed_dim}, "
          f"{'pre' if m.layer_norm_first else 'post'}-LN, {m.extractor_mode} extractor -> {args.out}")
    if notes:
        print(f"not in the source, freshly initialised: {', '.join(notes)}")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="speechssl checkpoint (pretraining, CTC fine-tuned or imported)")
    p.add_argument("--to", dest="target", required=True, choices=EXPORT_FORMATS, help="format to write")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--opset", type=POSITIVE, default=17, help="ONNX opset")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")


def run_export(args: argparse.Namespace) -> int:
    from speechssl.interop.common import InteropError, load_speechssl

    try:
        loaded = load_speechssl(args.ckpt)
        if loaded.cfg.model.extractor_mode == "fbank":
            raise InteropError(f"{args.ckpt} has speechssl's log-mel front-end (model.extractor_mode=fbank), which "
                               f"{args.target}'s wav2vec 2.0 / HuBERT models do not have (they read waveforms "
                               "through the conv stack): only waveform models export; use the checkpoint with "
                               "speechssl itself (finetune, evaluate, extract, probe)")
        left_out: list[str] = []
        if args.target == "hf":
            from speechssl.interop.hf import export_hf

            left_out = export_hf(loaded, args.out, args.force)
        elif args.target == "torchaudio":
            from speechssl.interop.torchaudio_io import export_torchaudio

            left_out = export_torchaudio(loaded, args.out, args.force)
        elif args.target == "fairseq2":
            from speechssl.interop.fairseq2 import export_fairseq2

            name = export_fairseq2(loaded, args.out, args.force)
            print(f"fairseq2 asset card '{name}': FAIRSEQ2_USER_ASSET_DIR={args.out}, then "
                  f"get_wav2vec2_model_hub().load_model('{name}')")
        else:
            from speechssl.interop.onnx import export_onnx

            export_onnx(loaded, args.out, args.force, args.opset)
    except (InteropError, FileNotFoundError, RuntimeError) as exc:
        print(f"speechssl export: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"speechssl export --to {args.target} needs the '{exc.name}' package: pip install {exc.name}",
              file=sys.stderr)
        return 1
    print(f"exported {args.ckpt} -> {args.out} ({args.target})")
    if left_out:
        print(f"no {args.target} counterpart, left out: {', '.join(left_out)}")
    return 0


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="speechssl checkpoint")
    p.add_argument("manifest_dir", metavar="MANIFEST_DIR", help="folder holding <split>.tsv")
    p.add_argument("--split", required=True, help="manifest split: reads MANIFEST_DIR/<split>.tsv")
    p.add_argument("--layers", default="all", help="'all' or comma-separated 1-based layers, e.g. 6,12")
    p.add_argument("--out", required=True, help="features folder (created)")
    p.add_argument("--nshard", type=POSITIVE, default=None, help="shards to cut the split into (default 1, or "
                   "WORLD_SIZE under torchrun)")
    p.add_argument("--shard", type=NON_NEGATIVE, default=None, help="do only this shard (0-based; default: all)")
    p.add_argument("--max-chunk", type=POSITIVE, default=1_600_000, help="longer utterances run in chunks of this "
                   "many samples")
    p.add_argument("--num-workers", type=NON_NEGATIVE, default=2, help="data-loader processes reading audio")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if a GPU) | cpu | cuda:N")
    p.add_argument("--force", action="store_true", help="redo finished shards")


def run_extract(args: argparse.Namespace) -> int:
    from speechssl.data.dataset import ManifestError
    from speechssl.features.extract import extract_split
    from speechssl.features.store import FeatureStoreError
    from speechssl.interop.common import InteropError
    from speechssl.interop.extract import MultiLayerExtractor

    try:
        extractor = MultiLayerExtractor(args.ckpt, args.layers, args.device, args.max_chunk)
        extract_split(extractor, args.manifest_dir, args.split, args.out, args.shard, args.nshard, args.force,
                      args.num_workers)
    except (FeatureStoreError, ManifestError, InteropError, FileNotFoundError, RuntimeError) as exc:
        print(f"speechssl extract: {exc}", file=sys.stderr)
        return 1
    return 0


# the command modules cli.py registers
import_command = SimpleNamespace(DESCRIPTION=IMPORT_DESCRIPTION, add_arguments=add_import_arguments, run=run_import)
export_command = SimpleNamespace(DESCRIPTION=EXPORT_DESCRIPTION, add_arguments=add_export_arguments, run=run_export)
extract_command = SimpleNamespace(DESCRIPTION=EXTRACT_DESCRIPTION, add_arguments=add_extract_arguments, run=run_extract)
