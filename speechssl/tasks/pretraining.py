"""What the pretraining tasks (wav2vec 2.0, HuBERT, data2vec 2.0) share: DDP's unused-parameter search and the probe.
"""

from __future__ import annotations


def may_leave_parameters_unused(cfg) -> bool:
    """Whether a pretraining step can leave a parameter without gradient, so that DDP must look for them
    (``find_unused_parameters``, an extra pass over the graph every step): LayerDrop skipping a layer, or a
    conv extractor frozen by ``feature_grad_mult: 0``; or the recipe asks for it."""
    m = cfg.model
    frozen_extractor = m.feature_grad_mult == 0 and m.extractor_mode != "fbank"
    return cfg.distributed_training.find_unused_parameters or m.encoder_layerdrop > 0 or frozen_extractor


def pretraining_probe(cfg):
    """The ``probe.*`` settings as the loop's probe function (None when ``probe.data`` is not set)."""
    if not cfg.probe.data:
        return None
    from speechssl.config import ConfigError
    from speechssl.tasks.probe import training_probe

    if cfg.checkpoint.best_checkpoint_metric.startswith("probe_"):
        raise ConfigError(f"checkpoint.best_checkpoint_metric={cfg.checkpoint.best_checkpoint_metric}: probe "
                          "metrics are logged, not used to select checkpoints; choose a validation metric such "
                          "as loss or accuracy")
    return training_probe(cfg.probe, cfg.task.normalize)
