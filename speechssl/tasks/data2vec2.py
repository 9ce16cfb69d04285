"""data2vec 2.0 pretraining task (fairseq's ``audio_pretraining`` with its ``data2vec_multi`` model, audio only).

:func:`build_data2vec2_pretraining` turns a recipe into a :class:`~speechssl.train.loop.TrainingSetup`: the
model (:class:`~speechssl.models.data2vec2.Data2Vec2Model`: student, decoder and EMA teacher), the regression
objective (:mod:`speechssl.objectives.data2vec2`), cropped unlabeled audio (never padded: the student encodes
the same number of frames of every row), and the collapse alarms on ``target_var`` / ``pred_var``. The
teacher's EMA step runs after every optimizer step (the trainer calls the model's ``update_teacher``).
``speechssl pretrain`` (:mod:`speechssl.pretrain`) dispatches to it for ``model.name: data2vec2``.
"""

from __future__ import annotations


def build_data2vec2_pretraining(cfg):
    """Model, objective, datasets and health alarms of data2vec 2.0 pretraining (a TrainingSetup)."""
    from speechssl.config import ConfigError
    from speechssl.data.dataset import dataset_for_split
    from speechssl.models.data2vec2 import Data2Vec2Model
    from speechssl.objectives import build_objective
    from speechssl.tasks.pretraining import may_leave_parameters_unused, pretraining_probe
    from speechssl.train.loop import TrainingSetup
    from speechssl.train.metrics import HealthMonitor

    m = cfg.model
    if cfg.criterion.name != "data2vec2":
        raise ConfigError(f"model.name=data2vec2 needs criterion.name=data2vec2, got '{cfg.criterion.name}'")
    if cfg.task.enable_padding:
        raise ConfigError("task.enable_padding=true: data2vec 2.0 pretraining crops every batch to its shortest "
                          "utterance (the student encodes the same number of frames of each row); set it false")
    model = Data2Vec2Model(m)
    objective = build_objective(cfg.criterion, m)
    train = dataset_for_split(cfg, cfg.dataset.train_subset)
    valid = None if cfg.dataset.disable_validation else dataset_for_split(cfg, cfg.dataset.valid_subset)
    # the loss rises while the teacher's targets gain variance: the collapse alarms watch this objective's
    # failure, not the loss
    health = HealthMonitor(min_target_var=m.min_target_var, min_pred_var=m.min_pred_var,
                           variance_start_update=min(max(2 * cfg.lr_scheduler.warmup_updates, 500), 5000),
                           loss_divergence=False)
    teacher = (f"teacher: EMA of the student encoder, decay {m.ema_decay:g} -> {m.ema_end_decay:g} over "
               f"{m.ema_anneal_end_step} updates; targets: mean of the top {m.average_top_k_layers} of "
               f"{m.encoder_layers - m.prenet_depth} layers")
    student = (f"student: {m.clone_batch} masked copies of each utterance ({100 * m.mask_prob:g}% of the frames in "
               f"blocks of {m.mask_length}), decoder {m.decoder_layers} x {m.decoder_dim}")
    return TrainingSetup(
        model=model, objective=objective, train_data=train, valid_data=valid, health=health,
        find_unused_parameters=may_leave_parameters_unused(cfg),
        probe=pretraining_probe(cfg), summary=[student, teacher],
    )
