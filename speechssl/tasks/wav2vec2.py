"""wav2vec 2.0 pretraining task (fairseq's ``audio_pretraining`` with ``model.name: wav2vec2``).

:func:`build_wav2vec2_pretraining` turns a recipe into a :class:`~speechssl.train.loop.TrainingSetup`: the
model (:class:`~speechssl.models.wav2vec2.Wav2Vec2Model`), the contrastive objective
(:mod:`speechssl.objectives.contrastive`), cropped unlabeled audio, and the codebook-collapse and
chance-accuracy alarms. ``speechssl pretrain`` (:mod:`speechssl.pretrain`) dispatches to it.
"""

from __future__ import annotations


def build_wav2vec2_pretraining(cfg):
    """Model, objective, datasets and health alarms of wav2vec 2.0 pretraining (a TrainingSetup)."""
    from speechssl.data.dataset import dataset_for_split
    from speechssl.models import build_model
    from speechssl.objectives import build_objective
    from speechssl.train.loop import TrainingSetup
    from speechssl.tasks.pretraining import may_leave_parameters_unused, pretraining_probe
    from speechssl.train.metrics import HealthMonitor

    m = cfg.model
    model = build_model(m)
    objective = build_objective(cfg.criterion, m)
    train = dataset_for_split(cfg, cfg.dataset.train_subset)
    valid = None if cfg.dataset.disable_validation else dataset_for_split(cfg, cfg.dataset.valid_subset)
    health = HealthMonitor(
        codebook_size=m.latent_groups * m.latent_vars if m.quantize_targets else None,
        chance_accuracy=1.0 / (1 + m.num_negatives + m.cross_sample_negatives + m.codebook_negatives),
        start_update=min(max(2 * cfg.lr_scheduler.warmup_updates, 500), 5000),
    )
    return TrainingSetup(
        model=model, objective=objective, train_data=train, valid_data=valid, health=health,
        find_unused_parameters=may_leave_parameters_unused(cfg),
        probe=pretraining_probe(cfg),
    )
