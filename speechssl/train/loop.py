"""The training loop shared by pretraining and fine-tuning: epochs, validation, checkpoints, resume, logs.

A task hands :func:`run_training` a ``build(cfg) -> TrainingSetup`` function (model, objective, datasets,
collater, health alarms); everything else here is task-independent:

* launching: one process, ``distributed_training.nproc`` spawned local processes, or torchrun's;
* resume: ``save_dir/checkpoint_last.pt`` is picked up automatically (model, optimizer, scaler, update
  count, epoch and batch position, RNG states) unless ``checkpoint.restart``;
* every ``common.log_interval`` updates a train record, at the validation points a valid record (to
  stdout, ``metrics.jsonl`` and TensorBoard); checkpoints at fairseq's save points (see checkpoint.py).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from speechssl.config import Config, ConfigError, require_set, save_config
from speechssl.config_check import check_values
from speechssl.data.batching import EpochBatchSampler
from speechssl.data.dataset import AudioDataset, Collater, collate
from speechssl.train import checkpoint as ckpt
from speechssl.train import distributed as dist
from speechssl.train.lr_scheduler import build_lr_schedule
from speechssl.train.metrics import HealthMonitor, IntervalMeter, MetricsLogger, Progress, format_eta
from speechssl.train.trainer import Trainer, resolve_precision, seed_everything
from speechssl.utils.io import deferred_interrupt


@dataclass
class TrainingSetup:
    """What a task supplies to the loop."""

    model: nn.Module
    objective: Callable
    train_data: AudioDataset
    valid_data: Optional[AudioDataset] = None
    collate: Collater = collate
    health: Optional[HealthMonitor] = None
    resume_sections: tuple[str, ...] = ("model",)  # config sections a resumed run must not change
    find_unused_parameters: bool = False  # DDP: parameters may get no gradient (e.g. LayerDrop)
    # probe.* settings: model -> extra validation metrics (probe_cer, probe_accuracy...), main rank only
    probe: Optional[Callable[[nn.Module], dict[str, float]]] = None
    summary: list[str] = field(default_factory=list)  # extra lines for the start-up summary


@dataclass
class RunOptions:
    restart: bool = False  # start over even if save_dir holds a checkpoint
    force: bool = False  # with restart: delete the previous run's files in save_dir


RUN_FILES = ("checkpoint*.pt", ".checkpoint*.tmp", "metrics.jsonl", "config.yaml", "tb")


def check_save_dir(save_dir: Path) -> None:
    """Create ``checkpoint.save_dir`` now, so that a file in the way or an unwritable place is reported before
    any work, as a config error naming the key."""
    if save_dir.exists() and not save_dir.is_dir():
        raise ConfigError(f"checkpoint.save_dir={save_dir} is a file; give a folder (it is created if missing)")
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".speechssl-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"checkpoint.save_dir={save_dir}: cannot write there ({exc.strerror or exc}); choose a "
                          "folder you can write to") from None


def prepare_save_dir(save_dir: Path, options: RunOptions) -> None:
    """Apply ``--restart`` / ``--force``: refuse to clobber a previous run unless forced."""
    if not options.restart or not save_dir.exists():
        return
    previous = sorted({p for pattern in RUN_FILES for p in save_dir.glob(pattern)})
    if not previous:
        return
    if not options.force:
        names = ", ".join(p.name for p in previous[:4]) + (" ..." if len(previous) > 4 else "")
        raise ConfigError(
            f"checkpoint.save_dir {save_dir} already holds a run ({names}); add --force to delete it and start "
            "over, drop --restart to resume it, or choose another checkpoint.save_dir")
    for p in previous:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_config(cfg: Config) -> None:
    """What a training run needs beyond valid ranges (speechssl.config_check), before any process starts."""
    check_values(cfg)  # again: a Config built in Python, not by load_config, gets the same errors
    require_set(cfg)
    if cfg.optimization.max_update <= 0 and cfg.optimization.max_epoch <= 0:
        raise ConfigError("set optimization.max_update (or optimization.max_epoch): training needs an end")
    if cfg.dataset.max_tokens is None and cfg.dataset.batch_size is None:
        raise ConfigError("set dataset.max_tokens (audio samples per batch) or dataset.batch_size")
    build_lr_schedule(cfg)
    resolve_precision(cfg, dist.select_device(cfg.common), warn=False)


def run_training(cfg: Config, build: Callable[[Config], TrainingSetup], options: RunOptions) -> None:
    """Train in this process, in ``distributed_training.nproc`` spawned ones, or as one torchrun rank."""
    check_config(cfg)
    nproc = cfg.distributed_training.nproc
    if dist.launched_by_torchrun():
        train_worker(cfg, build, options)
        return
    check_save_dir(Path(cfg.checkpoint.save_dir))
    prepare_save_dir(Path(cfg.checkpoint.save_dir), options)
    options = RunOptions(restart=False, force=False)  # handled: the workers see a clean save_dir
    if nproc > 1:
        if dist.select_device(cfg.common).type == "cuda" and nproc > torch.cuda.device_count():
            raise ConfigError(f"distributed_training.nproc={nproc} but only {torch.cuda.device_count()} GPUs")
        dist.spawn(train_worker, nproc, (cfg, build, options))
    else:
        train_worker(cfg, build, options)


def train_worker(cfg: Config, build: Callable[[Config], TrainingSetup], options: RunOptions) -> None:
    env = dist.init_distributed(cfg.common, cfg.distributed_training)
    try:
        if env.is_main and dist.launched_by_torchrun():
            check_save_dir(Path(cfg.checkpoint.save_dir))
            prepare_save_dir(Path(cfg.checkpoint.save_dir), options)
        dist.barrier()
        train(cfg, build, env)
    except RuntimeError as exc:
        if env.distributed and dist.is_peer_failure(exc):
            raise dist.DistributedError(
                f"rank {env.rank}: lost the connection to another process of the run ({str(exc).splitlines()[0]}); "
                "it probably died (see its log). Under torchrun --max-restarts the workers restart and resume from "
                f"{Path(cfg.checkpoint.save_dir) / ckpt.LAST}; otherwise run the same command again") from None
        raise
    finally:
        dist.cleanup()


def _one_thread_worker(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(data: AudioDataset, sampler: EpochBatchSampler, collate_fn: Collater, num_workers: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """DataLoader over ``sampler``'s batches: one torch thread per worker, persistent workers, and its own
    generator so that creating an iterator never draws from the global torch RNG."""
    return torch.utils.data.DataLoader(
        data, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        pin_memory=device.type == "cuda", worker_init_fn=_one_thread_worker if num_workers else None,
        persistent_workers=num_workers > 0, generator=torch.Generator())


def _groups(it: Iterator, size: int, count: int) -> Iterator[list]:
    """Split the next ``count`` items of ``it`` into lists of ``size`` (the last may be shorter)."""
    while count > 0:
        group = [next(it) for _ in range(min(size, count))]
        count -= len(group)
        yield group


class _Loop:
    def __init__(self, cfg: Config, setup: TrainingSetup, trainer: Trainer, env: dist.DistEnv):
        self.cfg, self.setup, self.trainer, self.env = cfg, setup, trainer, env
        self.save_dir = Path(cfg.checkpoint.save_dir)
        self.manager = ckpt.CheckpointManager(cfg.checkpoint, self.save_dir)
        self.epoch, self.offset = 1, 0
        self.best: Optional[float] = None  # best validation value of checkpoint.best_checkpoint_metric
        self.best_update: Optional[int] = None  # ... and the update it was reached at
        self.start_update = 0  # where this process started (resumed) from
        self.logger: Optional[MetricsLogger] = None  # set by train() once the resume point is known
        d = cfg.dataset
        common = dict(max_tokens=d.max_tokens, max_sentences=d.batch_size,
                      required_batch_size_multiple=d.required_batch_size_multiple, seed=cfg.common.seed,
                      rank=env.rank, world_size=env.world_size)
        tr = setup.train_data
        self.sampler = EpochBatchSampler(tr.batch_sizes, tr.target_len, shuffle=True, drop_uneven=True, **common)
        self.loader = make_loader(tr, self.sampler, setup.collate, d.num_workers, env.device)
        self.valid_loader = None
        va = setup.valid_data
        if va is not None and not d.disable_validation:
            vs = EpochBatchSampler(va.batch_sizes, va.target_len, shuffle=False, drop_uneven=False, **common)
            vs.set_epoch(0)  # fixed crops: validation losses are comparable over time
            self.valid_loader = make_loader(va, vs, setup.collate, min(d.num_workers, 1), env.device)

    # ------------------------------------------------------------------------------------------------
    def resume(self) -> list[str]:
        """Load ``checkpoint_last.pt`` (or, if damaged, the newest intact checkpoint) if there is one;
        return the lines to report. Rank 0 chooses the file, every rank loads it."""
        choice: tuple[Optional[Path], list[str]] | str = (None, [])
        state = None
        if self.env.is_main:
            try:
                path, state, damage_notes = ckpt.find_resume_checkpoint(self.save_dir)
                choice = (path, damage_notes)
            except ckpt.CheckpointError as exc:
                choice = str(exc)
        choice = dist.broadcast_object(choice)
        if isinstance(choice, str):
            raise ckpt.CheckpointError(choice)
        path, damage_notes = choice
        if path is None:
            return []
        if state is None:  # the other ranks
            state = ckpt.load_training_state(path)
        others = ckpt.check_resume_config(self.cfg, state, path, self.setup.resume_sections)
        self.trainer.load_state_dict(state)
        self.epoch, self.offset = int(state["epoch"]), int(state["batch_offset"])
        self.best = state.get("best")
        self.best_update = state.get("best_update")
        self.manager.resume_point = (self.trainer.num_updates, path)
        self.start_update = self.trainer.num_updates
        old_world = int(state.get("world_size", 1))
        rng = state.get("rng") or []
        notes = [f"resumed from {path} at update {self.trainer.num_updates} (epoch {self.epoch}, "
                 f"batch {self.offset} of {len(self.sampler.batches(self.epoch))})"]
        if old_world == self.env.world_size and self.env.rank < len(rng):
            ckpt.set_rng_state(rng[self.env.rank])
        elif old_world != self.env.world_size:  # same global position, approximately
            self.offset = self.offset * old_world // self.env.world_size
            notes.append(f"note: checkpoint written by {old_world} processes, now {self.env.world_size}: "
                         "the data position is mapped approximately, resume is not exact")
        return damage_notes + notes + [f"  changed since the checkpoint: {line}" for line in others]

    def state(self, end_of_epoch: bool) -> dict[str, Any]:
        epoch, offset = (self.epoch + 1, 0) if end_of_epoch else (self.epoch, self.offset)
        return {**self.trainer.state_dict(), "epoch": epoch, "batch_offset": offset,
                "world_size": self.env.world_size, "update_freq": self.cfg.optimization.update_freq,
                "best": self.best, "best_update": self.best_update, "rng": dist.all_gather_object(ckpt.rng_state()),
                "config": self.cfg.to_dict(), "version": ckpt.VERSION}

    def msg(self, text: str) -> None:
        if self.env.is_main:
            self.logger.message(text)

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> Optional[float]:
        """Validate; return the value of ``checkpoint.best_checkpoint_metric`` (None without validation)."""
        if self.valid_loader is None:
            return None
        t0 = time.perf_counter()
        batches = self.valid_loader
        if self.env.is_main:
            batches = Progress(batches, len(self.valid_loader), f"valid (update {self.trainer.num_updates})",
                               unit="batch", enabled=self.logger.format != "json")
        stats = self.trainer.validate(batches)
        if stats is None:
            return None
        n, every = self.trainer.num_updates, self.cfg.probe.interval_updates
        if self.setup.probe is not None and self.env.is_main and (every <= 0 or n % every == 0):
            t1 = time.perf_counter()
            stats.update(self.setup.probe(self.trainer.model))
            stats["probe_seconds"] = time.perf_counter() - t1
        rec = {"split": "valid", "update": n, "epoch": self.epoch, **stats,
               "seconds": time.perf_counter() - t0, "time": time.time()}
        if self.env.is_main:
            self.logger.log(rec)
        metric = self.cfg.checkpoint.best_checkpoint_metric
        if metric not in stats:
            raise ConfigError(f"checkpoint.best_checkpoint_metric: '{metric}' is not a validation metric of this "
                              f"task; choose one of {', '.join(sorted(stats))}")
        return stats[metric]

    def save(self, end_of_epoch: bool, valid_loss: Optional[float]) -> None:
        """Checkpoint (all ranks call it); ``valid_loss``: the best-checkpoint metric, if validated."""
        maximize = self.cfg.checkpoint.maximize_best_checkpoint_metric
        is_best = valid_loss is not None and (
            self.best is None or (valid_loss > self.best if maximize else valid_loss < self.best))
        if is_best:
            self.best, self.best_update = valid_loss, self.trainer.num_updates
        state = self.state(end_of_epoch)  # every rank takes part (RNG gather)
        if self.env.is_main:
            with deferred_interrupt():  # Ctrl-C waits for the checkpoint and its copies
                path = self.manager.save(state, self.epoch, self.trainer.num_updates, end_of_epoch, is_best)
            self.msg(f"saved {path.name} (update {self.trainer.num_updates}{', best' if is_best else ''})")
        dist.barrier()

    def log_train(self, meter: IntervalMeter) -> None:
        rec = {"split": "train", "update": self.trainer.num_updates, "epoch": self.epoch,
               **meter.summary(self.setup.train_data.sample_rate)}
        rec.update(nonfinite_total=self.trainer.nonfinite_total, time=time.time())
        max_update = self.cfg.optimization.max_update
        if max_update and rec.get("updates_per_sec"):
            rec["eta"] = format_eta((max_update - self.trainer.num_updates) / rec["updates_per_sec"])
        if self.setup.health is not None:
            rec["alarms"] = self.setup.health.check(rec)
        if self.env.is_main:
            self.logger.progress(0, rec)
            self.logger.log(rec)
        meter.reset()

    # ------------------------------------------------------------------------------------------------
    def done(self) -> bool:
        o = self.cfg.optimization
        return bool((o.max_update and self.trainer.num_updates >= o.max_update)
                    or (o.max_epoch and self.epoch > o.max_epoch))

    def validate_and_save(self, updated: bool, end_of_epoch: bool, stop: bool) -> None:
        """fairseq's rules: save at the update/epoch intervals and at the end; validate at the validation
        intervals, at every mid-epoch save and at the end."""
        n, ck, d = self.trainer.num_updates, self.cfg.checkpoint, self.cfg.dataset

        def every(interval: int) -> bool:
            return updated and interval > 0 and n % interval == 0

        save = stop or (end_of_epoch and self.epoch % max(1, ck.save_interval) == 0) \
            or every(ck.save_interval_updates)
        valid = stop or (save and not end_of_epoch) or every(d.validate_interval_updates) \
            or (end_of_epoch and self.epoch % max(1, d.validate_interval) == 0)
        loss = self.validate() if valid else None
        if save:
            self.save(end_of_epoch, loss)

    def run(self) -> None:
        o = self.cfg.optimization
        meter = IntervalMeter()
        if self.done():
            self.msg(f"nothing to do: the run in {self.save_dir} is finished (update {self.trainer.num_updates}); "
                     "raise optimization.max_update / max_epoch to continue it")
            return
        while not self.done():
            self.sampler.set_epoch(self.epoch, self.offset)
            n_batches = len(self.sampler.batches(self.epoch))
            if n_batches == 0:
                raise ConfigError(f"the training set gives no batch per process (world size {self.env.world_size});"
                                  " lower dataset.max_tokens or use fewer processes")
            batches = iter(self.loader)
            t0 = time.perf_counter()
            for group in _groups(batches, o.update_freq, n_batches - self.offset):
                stats = self.trainer.train_step(group)
                self.offset += len(group)
                meter.add(stats, time.perf_counter() - t0)
                n, updated = self.trainer.num_updates, not stats["skipped"]
                if not updated:
                    why = (f"non-finite {stats['nonfinite']}; {self.trainer.nonfinite_total} so far"
                           if "nonfinite" in stats else f"fp16 overflow, loss scale now {stats.get('loss_scale')}")
                    self.msg(f"update {n + 1} skipped ({why})")
                if self.env.is_main:
                    self.logger.progress(int(updated))
                end_of_epoch = self.offset >= n_batches
                stop = bool(o.max_update and n >= o.max_update) \
                    or bool(end_of_epoch and o.max_epoch and self.epoch >= o.max_epoch)
                if updated and n % self.cfg.common.log_interval == 0:
                    self.log_train(meter)
                if updated or end_of_epoch:
                    self.validate_and_save(updated, end_of_epoch, stop)
                if stop:
                    break
                t0 = time.perf_counter()
            if self.offset >= n_batches:
                self.epoch, self.offset = self.epoch + 1, 0
        if meter.updates:
            self.log_train(meter)


def train(cfg: Config, build: Callable[[Config], TrainingSetup], env: dist.DistEnv) -> None:
    """Build the task's setup, resume if ``save_dir`` holds a checkpoint, and train to the end."""
    seed_everything(cfg.common.seed)
    if cfg.distributed_training.distributed_world_size != env.world_size:
        recipe_world = cfg.distributed_training.distributed_world_size
        cfg.distributed_training.distributed_world_size = env.world_size
    else:
        recipe_world = None
    setup = build(cfg)
    trainer = Trainer(cfg, setup.model, setup.objective, env, setup.find_unused_parameters)
    loop = _Loop(cfg, setup, trainer, env)
    notes = loop.resume()
    save_dir = Path(cfg.checkpoint.save_dir)
    if env.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, save_dir / "config.yaml")
    tb_dir = Path(cfg.common.tensorboard_logdir) if cfg.common.tensorboard_logdir else save_dir / "tb"
    loop.logger = MetricsLogger(save_dir, cfg.common.log_format, tb_dir, trainer.num_updates,
                                cfg.optimization.max_update, enabled=env.is_main)
    t0 = time.time()
    try:
        if env.is_main:
            _summary(loop, recipe_world)
            for line in notes:
                loop.msg(line)
        loop.run()
    except KeyboardInterrupt:
        if env.is_main:
            loop.msg(_resume_note(loop))
        raise
    finally:
        loop.logger.close()
    if env.is_main and loop.trainer.num_updates > loop.start_update:
        for line in end_summary(loop, time.time() - t0):
            print(line, flush=True)


def _resume_note(loop: _Loop) -> str:
    n = loop.trainer.num_updates
    if loop.manager.resume_point is None:
        return (f"interrupted at update {n} before the first checkpoint: running the same command again starts "
                "over (checkpoints every checkpoint.save_interval_updates updates)")
    update, path = loop.manager.resume_point
    return (f"interrupted at update {n}: running the same command again resumes from update {update} "
            f"({path})")


def end_summary(loop: _Loop, seconds: float) -> list[str]:
    """The closing lines of a run: what was done, where the best checkpoint is, what to run next."""
    cfg, n = loop.cfg, loop.trainer.num_updates
    save_dir = loop.save_dir
    lines = [f"done: update {n} (epoch {loop.epoch if loop.offset else loop.epoch - 1}), "
             f"{n - loop.start_update} updates in {format_eta(seconds) if seconds >= 60 else f'{seconds:.1f} s'}"
             + (f" (resumed at update {loop.start_update})" if loop.start_update else "")]
    best = save_dir / ckpt.BEST
    if loop.best is not None and best.exists():
        at = f" at update {loop.best_update}" if loop.best_update is not None else ""
        lines.append(f"best valid {cfg.checkpoint.best_checkpoint_metric} {loop.best:.4g}{at}: {best}")
    else:
        best = save_dir / ckpt.LAST
    lines.append(f"last: {save_dir / ckpt.LAST}")
    lines.append("next:")
    lines.append(f"  speechssl plot {save_dir}")
    mel = getattr(cfg.model, "extractor_mode", "") == "fbank"
    if cfg.task.name in ("audio_pretraining", "hubert_pretraining"):
        if cfg.criterion.name == "data2vec2":  # its valid loss is no quality signal: the last checkpoint
            best = save_dir / ckpt.LAST
        recipe = "ctc_mel_tiny.yaml" if mel else "ctc_tiny.yaml"
        lines.append(f"  speechssl probe {best} LABELED_MANIFEST_DIR --task asr")
        lines.append(f"  speechssl finetune recipes/{recipe} task.data=LABELED_MANIFEST_DIR "
                     f"model.w2v_path={best} checkpoint.save_dir={save_dir}_ctc")
    else:
        data = Path(cfg.task.data)
        split = "test" if (data / "test.tsv").exists() else cfg.dataset.valid_subset
        lines.append(f"  speechssl evaluate {best} {data} --split {split}")
    if not mel:  # log-mel models do not export (the other toolkits' models read waveforms)
        lines.append(f"  speechssl export {best} --to hf --out {save_dir}_hf")
    return lines


def _summary(loop: _Loop, recipe_world: Optional[int]) -> None:
    cfg, env, setup, trainer = loop.cfg, loop.env, loop.setup, loop.trainer
    tr, sr = setup.train_data, setup.train_data.sample_rate
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_train = sum(p.numel() for p in trainer.params)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[trainer.amp_dtype]
    batches = loop.sampler.batches(1)
    per_update = (cfg.dataset.max_tokens or 0) * env.world_size * cfg.optimization.update_freq
    lines = [
        f"model: {type(trainer.model).__name__}, {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained)",
        f"device: {env.device}, {env.world_size} process(es), {precision}, update_freq {cfg.optimization.update_freq}",
        f"train: {tr.manifest.path} {len(tr)} utterances ({tr.sizes.sum() / sr / 3600:.2f} h), "
        f"{tr.num_dropped} shorter than task.min_sample_size dropped; {len(batches)} batches per epoch and process",
        f"batch: up to {cfg.dataset.max_tokens} samples per process, {per_update / sr:.1f} s of audio per update",
    ]
    if setup.valid_data is not None:
        va = setup.valid_data
        lines.append(f"valid: {va.manifest.path} {len(va)} utterances ({va.num_dropped} dropped)")
    dropped = loop.sampler.num_dropped(1)
    if dropped:
        lines.append(f"note: {dropped} batch(es) per epoch dropped so that all {env.world_size} processes take "
                     "the same number of steps")
    if recipe_world is not None:
        lines.append(f"note: the recipe assumes distributed_training.distributed_world_size={recipe_world}, running "
                     f"on {env.world_size}; set optimization.update_freq={max(1, recipe_world // env.world_size)} "
                     "to keep its batch size")
    for line in lines + setup.summary:
        loop.msg(line)
