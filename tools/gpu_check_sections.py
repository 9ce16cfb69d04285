#!/usr/bin/env python
"""The measuring sections of ``tools/gpu_check.sh`` (run by ``tools/gpu_check.py``, one process each).

    python tools/gpu_check_sections.py SECTION --json FILE [--dry-run] [--work DIR]

Each section writes its results to ``FILE`` after every measurement, so a section stopped at its time
limit still reports what it measured. ``--dry-run``: the same code paths on the CPU at tiny sizes.

* ``env``: versions, the device, the driver;
* ``steps``: wav2vec 2.0 BASE and HuBERT BASE training steps (forward, backward, optimizer) through
  speechssl's :class:`~speechssl.train.trainer.Trainer` in bf16 at the published per-GPU batch
  (``dataset.max_tokens`` 1.4M samples: 5 crops of 250,000) and at 4x that, beside transformers'
  ``Wav2Vec2ForPreTraining`` and torchaudio's ``hubert_pretrain_model`` (HuBERT BASE, K=500) in the same
  process; data2vec 2.0 BASE (8 masked copies per utterance, the teacher's EMA step included) on the same
  5 crops of 250,000 samples as wav2vec 2.0 (equal audio per batch; no other toolkit pretrains it):
  audio-seconds/s, tokens/s (1 token = one 20 ms frame), model FLOPs (``FlopCounterMode`` of one
  step) and their utilisation of the bf16 matmul peak measured here, peak memory
  (``max_memory_allocated``, one implementation alive at a time), host-device syncs per update
  (``torch.cuda.set_sync_debug_mode("warn")``, and :func:`speechssl.utils.device.count_host_reads`);
* ``compile``: the same speechssl steps with ``common.compile: true`` (torch.compile of each Transformer
  layer; dry run: dynamo's eager backend), first-step (compile) time and steady step time;
* ``fp16``: 50 updates of wav2vec 2.0 BASE with ``common.fp16: true`` (autocast fp16 + the loss scaler):
  every loss, the loss scale, the overflows;
* ``data``: the training data pipeline (FLAC corpus written here, ``dataset.num_workers`` workers, the
  trainer's DataLoader) against the step: the share of the time spent waiting for a batch;
* ``kmeans``: speechssl's k-means on the GPU against scikit-learn's MiniBatchKMeans with fairseq's HuBERT
  settings, HuBERT iteration-2 shape (100,000 x 768, K=500, as tools/bench_kmeans.py's ``hubert`` case).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SAMPLE_RATE = 16000
PUBLISHED_MAX_TOKENS = 1_400_000
K_ITER2 = 500


class Results(dict):
    """A section's results, rewritten to its JSON file by :meth:`save`."""

    def __init__(self, path: Path, dry_run: bool):
        super().__init__(dry_run=dry_run)
        self.path = path

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        tmp.replace(self.path)


def pick_device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run the check on a GPU machine (or --dry-run)")
    return torch.device("cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bf16_matmul_peak(device: torch.device, dry_run: bool) -> float:
    """bf16 matmul TFLOP/s of an n x n x n product (n = 8192 on the GPU), mean of 10 after 3 warm-ups."""
    n = 512 if dry_run else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 2 * n**3 / ((time.perf_counter() - t0) / 10) / 1e12


# --------------------------------------------------------------------------------------------------
# configurations and batches
# --------------------------------------------------------------------------------------------------


RECIPES = {"wav2vec2": "wav2vec2_base.yaml", "hubert": "hubert_base_iter2.yaml", "data2vec2": "data2vec2_base.yaml"}


def recipe_config(name: str, max_tokens: int, device: torch.device, dry_run: bool, *overrides: str):
    """The published recipe (wav2vec2_base.yaml / hubert_base_iter2.yaml with K=500 / data2vec2_base.yaml with
    wav2vec 2.0's crops) in bf16 without LayerDrop (every step does the same work); dry run: the tests' tiny
    models, 0.5 s crops."""
    from speechssl.config import load_config
    from speechssl.models import data2vec2_tiny_config, hubert_tiny_config, wav2vec2_tiny_config

    recipe = ROOT / "recipes" / RECIPES[name]
    extra = [f"model.num_classes=[{K_ITER2}]", "model.label_rate=50"] if name == "hubert" else []
    if name == "data2vec2" and not dry_run:  # wav2vec 2.0 BASE's crops: equal audio per batch
        extra.append("task.max_sample_size=250000")
    if dry_run:  # 0.5 s crops (the config check wants crops that fit a batch)
        extra.append("task.max_sample_size=8000")
    cfg = load_config(recipe, ["common.fp16=false", "common.bf16=true", f"common.device={device.type}",
                               "model.encoder_layerdrop=0.0", f"dataset.max_tokens={max_tokens}", *extra,
                               *overrides])
    if dry_run:
        cfg.model = {"wav2vec2": wav2vec2_tiny_config, "data2vec2": data2vec2_tiny_config,
                     "hubert": lambda: hubert_tiny_config([8], 50.0)}[name]()
    return cfg


def make_batch(cfg, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """``max_tokens // max_sample_size`` crops of ``max_sample_size`` samples (noise, on the device) and, for
    HuBERT, random labels at the frame rate."""
    from speechssl.models.frontend import build_feature_extractor

    T = cfg.task.max_sample_size
    B = max(1, cfg.dataset.max_tokens // T)
    g = torch.Generator().manual_seed(seed)
    source = (0.1 * torch.randn(B, T, generator=g)).to(device)
    batch: dict[str, Any] = {"source": source, "padding_mask": None, "audio_samples": B * T}
    frames = build_feature_extractor(cfg.model).num_frames(T)
    if cfg.model.name == "hubert":
        batch["target_list"] = [torch.randint(0, cfg.model.num_classes[0], (B, frames), generator=g).to(device)]
    batch["frames"] = B * frames
    return batch


# --------------------------------------------------------------------------------------------------
# timing one implementation
# --------------------------------------------------------------------------------------------------


def count_syncs(step: Callable[[], Any], device: torch.device, dispatch: bool = True) -> dict[str, int]:
    """Host-device syncs of one call: CUDA's own count (sync debug mode) and, with ``dispatch``, the
    dispatcher's (:func:`count_host_reads`; not around compiled code: a dispatch mode makes dynamo
    recompile)."""
    from speechssl.utils.device import count_host_reads

    out: dict[str, int] = {}
    if device.type == "cuda":
        synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    if not dispatch:
        return out
    with count_host_reads() as reads:
        step()
    out["host_reads"] = sum(v for k, v in reads.items() if k != "host_copy")
    out["host_copies"] = reads.get("host_copy", 0)
    return out


def count_flops(step: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"first_step_s": first, "step_s": statistics.median(times), "min_step_s": min(times)}


def measure(row: dict[str, Any], build: Callable[[], Callable[[], Any]], batch: dict[str, Any],
            device: torch.device, peak_tflops: float, warmup: int, steps: int, syncs: bool) -> dict[str, Any]:
    """Fill ``row`` with the step's time, throughput, FLOPs, utilisation, memory (and syncs). Compiled steps
    are not run under dispatch modes (FLOPs, host reads): the report takes their FLOPs from the eager row."""
    release(device)
    try:
        step = build()
        row.update(time_steps(step, device, warmup, steps))
        row["peak_gib"] = peak_gib(device)
        seconds = batch["audio_samples"] / SAMPLE_RATE
        row["audio_s_per_s"] = seconds / row["step_s"]
        row["tokens_per_s"] = batch["frames"] / row["step_s"]
        if not row["compile"]:
            row["tflop_per_step"] = count_flops(step) / 1e12
            row["mfu"] = row["tflop_per_step"] / row["step_s"] / peak_tflops
        if syncs:
            row.update(count_syncs(step, device, dispatch=not row["compile"]))
    except Exception as exc:  # noqa: BLE001  (a failing implementation is a row of the report, not the end)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        step = None  # noqa: F841  (free the model before the next implementation)
        release(device)
    return row


def speechssl_step(cfg, batch: dict[str, Any], device: torch.device,
                   compile_backend: Optional[str] = None) -> Callable[[], Any]:
    """One ``Trainer.train_step`` (the trainer compiles with inductor when ``common.compile``; a dry run
    passes ``compile_backend``)."""
    from speechssl.models import build_model
    from speechssl.models.components import compile_transformer_layers
    from speechssl.objectives import build_objective
    from speechssl.train.distributed import DistEnv
    from speechssl.train.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(cfg.model), build_objective(cfg.criterion, cfg.model), DistEnv(device=device))
    if compile_backend:
        compile_transformer_layers(trainer.model, compile_backend)
    samples = [{k: v for k, v in batch.items() if k != "frames"}]
    return lambda: trainer.train_step(samples)


def reference_step(cfg, batch: dict[str, Any], device: torch.device) -> Callable[[], Any]:
    """transformers' Wav2Vec2ForPreTraining / torchaudio's HuBERT with the same network, bf16 autocast."""
    torch.manual_seed(0)
    if cfg.model.name == "wav2vec2":
        from bench_pretrain_step import TransformersStep

        ref = TransformersStep(0.0, device, cfg=cfg.model)
        return lambda: ref(batch["source"], True)
    from bench_hubert_step import TorchaudioStep
    from torchaudio.models.wav2vec2.model import hubert_pretrain_model

    from speechssl.models.weights import torchaudio_hubert_pretrain_kwargs

    ref = TorchaudioStep(0.0, device, model=hubert_pretrain_model(**torchaudio_hubert_pretrain_kwargs(cfg.model)))
    return lambda: ref(batch["source"], batch["target_list"][0], True)


REFERENCE = {"wav2vec2": "transformers", "hubert": "torchaudio"}


def step_rows(res: Results, device: torch.device, dry_run: bool, compiled: bool) -> None:
    res["peak_bf16_tflops"] = bf16_matmul_peak(device, dry_run)
    res["rows"] = []
    res.save()
    sizes = [16000] if dry_run else ([PUBLISHED_MAX_TOKENS] if compiled else [PUBLISHED_MAX_TOKENS, 4 * PUBLISHED_MAX_TOKENS])
    warmup, steps = (1, 2) if dry_run else (3, 8)
    for name in ("wav2vec2", "hubert", "data2vec2"):
        if name == "data2vec2" and compiled:
            continue
        for max_tokens in sizes[:1] if name == "data2vec2" else sizes:
            extra = ["common.compile=true"] if compiled and not dry_run else []
            cfg = recipe_config(name, max_tokens, device, dry_run, *extra)
            batch = make_batch(cfg, device)
            impls = ["speechssl"] if compiled or name not in REFERENCE else ["speechssl", REFERENCE[name]]
            for impl in impls:
                row = {"model": name, "impl": impl, "max_tokens": max_tokens, "compile": compiled,
                       "batch": list(batch["source"].shape), "frames": batch["frames"]}
                res["rows"].append(row)
                if impl == "speechssl":
                    backend = "eager" if compiled and dry_run else None
                    build = lambda: speechssl_step(cfg, batch, device, backend)  # noqa: E731
                else:
                    build = lambda: reference_step(cfg, batch, device)  # noqa: E731
                measure(row, build, batch, device, res["peak_bf16_tflops"], warmup, steps, syncs=impl == "speechssl")
                res.save()
            del batch
            release(device)


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


def section_env(res: Results, args) -> None:
    import subprocess

    from importlib import metadata

    res.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), cpus=os.cpu_count(), platform=platform.platform())
    for key, dist in (("torchaudio", "torchaudio"), ("transformers", "transformers"), ("sklearn", "scikit-learn"),
                      ("soundfile", "soundfile"), ("jiwer", "jiwer"), ("numpy", "numpy")):
        try:
            res[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # a missing package is a finding of the check, not its failure
            res[key] = "missing"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res.update(device=p.name, memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                   multiprocessors=p.multi_processor_count)
        try:
            res["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            res["driver"] = f"nvidia-smi: {exc}"
    else:
        res["device"] = "cpu (no CUDA)"
    res.save()


def section_steps(res: Results, args) -> None:
    step_rows(res, pick_device(args.dry_run), args.dry_run, compiled=False)


def section_compile(res: Results, args) -> None:
    step_rows(res, pick_device(args.dry_run), args.dry_run, compiled=True)


def section_fp16(res: Results, args) -> None:
    """wav2vec 2.0 BASE with the published fp16 setting (the recipe's LR schedule, init scale 128)."""
    from speechssl.models import build_model
    from speechssl.objectives import build_objective
    from speechssl.train.distributed import DistEnv
    from speechssl.train.trainer import Trainer

    device = pick_device(args.dry_run)
    updates = 5 if args.dry_run else 50
    cfg = recipe_config("wav2vec2", 16000 if args.dry_run else PUBLISHED_MAX_TOKENS, device, args.dry_run,
                        "common.bf16=false", "common.fp16=true")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU dry run warns that fp16 falls back to bf16
        trainer = Trainer(cfg, build_model(cfg.model), build_objective(cfg.criterion, cfg.model), DistEnv(device=device))
    res.update(amp_dtype=str(trainer.amp_dtype).replace("torch.", ""), loss_scaler=trainer.scaler is not None,
               init_scale=cfg.common.fp16_init_scale, updates=0, losses=[], scales=[], skipped=0, overflows=0)
    for i in range(updates):
        stats = trainer.train_step([{k: v for k, v in make_batch(cfg, device, seed=i).items() if k != "frames"}])
        res["updates"] += 1
        res["losses"].append(stats["loss"])
        res["scales"].append(stats.get("loss_scale"))
        res["skipped"] += int(stats["skipped"])
        res["overflows"] += int(stats.get("overflow", False))
        res.save()
    finite = [v for v in res["losses"] if np.isfinite(v)]
    res["all_finite"] = len(finite) == len(res["losses"])
    scales = [s for s in res["scales"] if s is not None]
    res.update(scale_first=scales[0] if scales else None, scale_min=min(scales) if scales else None,
               scale_last=scales[-1] if scales else None)
    res.save()


def write_corpus(root: Path, n: int, seconds: tuple[float, float], seed: int = 0) -> Path:
    """``n`` FLAC files of tones + noise, ``seconds`` long (uniform), and ``train.tsv`` listing them."""
    import concurrent.futures

    import soundfile as sf

    rng = np.random.default_rng(seed)
    lengths = (rng.uniform(*seconds, n) * SAMPLE_RATE).astype(int)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        r = np.random.default_rng(seed + i)
        t = np.arange(lengths[i]) / SAMPLE_RATE
        x = 0.3 * np.sin(2 * np.pi * (120 + 30 * (i % 9)) * t) + 0.05 * r.standard_normal(lengths[i])
        sf.write(audio / f"u{i:04d}.flac", x.astype(np.float32), SAMPLE_RATE)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, range(n)))
    (root / "train.tsv").write_text(str(audio) + "\n" + "".join(f"u{i:04d}.flac\t{m}\n" for i, m in enumerate(lengths)))
    return root


def section_data(res: Results, args) -> None:
    """The trainer fed by the real pipeline (manifest, FLAC decoding, crops, collate, pinned DataLoader)."""
    from speechssl.data.batching import EpochBatchSampler
    from speechssl.pretrain import build_pretraining
    from speechssl.train.distributed import DistEnv
    from speechssl.train.loop import make_loader
    from speechssl.train.trainer import Trainer

    device = pick_device(args.dry_run)
    work = Path(args.work)
    n, seconds, updates = (12, (1.0, 2.0), 6) if args.dry_run else (240, (10.0, 16.0), 40)
    t0 = time.perf_counter()
    corpus = write_corpus(work / "corpus", n, seconds)
    res["corpus"] = {"files": n, "seconds": list(seconds), "write_s": time.perf_counter() - t0}
    res.save()
    cfg = recipe_config("wav2vec2", 16000 if args.dry_run else PUBLISHED_MAX_TOKENS, device, args.dry_run,
                        f"task.data={corpus}", "dataset.disable_validation=true")
    if args.dry_run:
        cfg.task.min_sample_size, cfg.dataset.num_workers = 8000, 2
    torch.manual_seed(0)
    setup = build_pretraining(cfg)
    trainer = Trainer(cfg, setup.model, setup.objective, DistEnv(device=device), setup.find_unused_parameters)
    d = cfg.dataset
    sampler = EpochBatchSampler(setup.train_data.batch_sizes, setup.train_data.target_len, max_tokens=d.max_tokens,
                                max_sentences=d.batch_size, required_batch_size_multiple=d.required_batch_size_multiple,
                                seed=cfg.common.seed, rank=0, world_size=1, shuffle=True, drop_uneven=True)
    loader = make_loader(setup.train_data, sampler, setup.collate, d.num_workers, device)
    res.update(num_workers=d.num_workers, waits=[], steps=[], audio_s=[])
    done, epoch = 0, 1
    while done < updates:
        sampler.set_epoch(epoch)
        it = iter(loader)
        while done < updates:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            trainer.train_step([batch])
            synchronize(device)
            t2 = time.perf_counter()
            res["waits"].append(t1 - t0)
            res["steps"].append(t2 - t1)
            res["audio_s"].append(batch["audio_samples"] / SAMPLE_RATE)
            done += 1
            res.save()
        epoch += 1
    skip = min(3, len(res["waits"]) - 1)  # the workers' start-up
    wait, step = sum(res["waits"][skip:]), sum(res["steps"][skip:])
    res.update(updates=done, wait_share=wait / max(wait + step, 1e-9), median_step_s=statistics.median(res["steps"][skip:]),
               median_wait_s=statistics.median(res["waits"][skip:]),
               audio_s_per_s=sum(res["audio_s"][skip:]) / max(wait + step, 1e-9))
    res.save()


def section_kmeans(res: Results, args) -> None:
    from bench_kmeans import gaussian_mixture, sklearn_fit

    from speechssl.cluster.kmeans import KMeansSettings, fit_kmeans, inertia

    device = pick_device(args.dry_run)
    n, dim, k = (4000, 16, 10) if args.dry_run else (100_000, 768, K_ITER2)
    t0 = time.perf_counter()
    x = gaussian_mixture(n, dim, 2 * k, seed=1234)
    res.update(n=n, dim=dim, k=k, data_s=time.perf_counter() - t0)
    res.save()
    x_dev = torch.from_numpy(x).to(device)
    x64 = x_dev.double()
    synchronize(device)
    t0 = time.perf_counter()
    model = fit_kmeans(x_dev, KMeansSettings(k=k, seed=0, device=device.type))
    synchronize(device)
    res["speechssl_s"] = time.perf_counter() - t0
    res["speechssl_inertia_per_point"] = inertia(x64, model.centroids.to(device).double()) / n
    res["speechssl_settings"] = model.settings
    res.save()
    t0 = time.perf_counter()
    centroids = sklearn_fit(x, k, seed=0, threads=None)
    res["sklearn_s"] = time.perf_counter() - t0
    res["sklearn_inertia_per_point"] = inertia(x64, torch.from_numpy(centroids).to(device).double()) / n
    res["speedup"] = res["sklearn_s"] / res["speechssl_s"]
    res["inertia_diff"] = res["speechssl_inertia_per_point"] / res["sklearn_inertia_per_point"] - 1
    res.save()


SECTIONS = {"env": section_env, "steps": section_steps, "compile": section_compile, "fp16": section_fp16,
            "data": section_data, "kmeans": section_kmeans}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--json", type=Path, required=True, help="results file (rewritten as the section goes)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the code paths only")
    ap.add_argument("--work", default=None, help="scratch folder (the data section's corpus)")
    args = ap.parse_args()
    res = Results(args.json, args.dry_run)
    res.save()
    with contextlib.ExitStack() as stack:
        if args.work is None:
            args.work = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
        SECTIONS[args.section](res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
