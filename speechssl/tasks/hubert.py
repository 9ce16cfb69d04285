"""HuBERT pretraining task (fairseq's ``hubert_pretraining``): cluster-label targets checked against the audio.

:func:`build_hubert_pretraining` turns a recipe into a :class:`~speechssl.train.loop.TrainingSetup`; the labels
come from the label pipeline (``speechssl features`` -> ``kmeans`` -> ``label``). ``speechssl pretrain``
(:mod:`speechssl.pretrain`) dispatches to it.
"""

from __future__ import annotations


def build_hubert_pretraining(cfg):
    """HuBERT: label dictionaries -> ``model.num_classes`` / ``model.label_rate``, model, objective,
    datasets with label targets checked against the audio lengths, chance-accuracy alarm (a TrainingSetup).

    ``model.num_classes`` and ``model.label_rate`` are filled from the dictionaries and ``task.label_rate``
    (and stored in the checkpoints' config); values set in the recipe must agree with them.
    """
    from pathlib import Path

    from speechssl.config import ConfigError
    from speechssl.data.dataset import dataset_for_split
    from speechssl.data.labels import LabelCollater, LabelDictionary, check_label_lengths
    from speechssl.models.hubert import HubertModel
    from speechssl.objectives import build_objective
    from speechssl.train.loop import TrainingSetup
    from speechssl.tasks.pretraining import may_leave_parameters_unused, pretraining_probe
    from speechssl.train.metrics import HealthMonitor

    t, m = cfg.task, cfg.model
    if m.name != "hubert":
        raise ConfigError(f"task.name=hubert_pretraining needs model.name=hubert, got '{m.name}'")
    if not t.labels:
        raise ConfigError("task.labels is empty: HuBERT needs frame labels, e.g. task.labels=[km] (files <split>.km "
                          "and dict.km.txt from 'speechssl label')")
    if t.label_rate <= 0:
        raise ConfigError("set task.label_rate (labels per second): 100 for MFCC k-means labels, 50 for labels of "
                          "layer features (iteration 2)")
    if m.label_rate > 0 and m.label_rate != t.label_rate:
        raise ConfigError(f"model.label_rate={m.label_rate:g} differs from task.label_rate={t.label_rate:g}; "
                          "leave model.label_rate unset (it follows the task)")
    label_dir = Path(t.label_dir) if t.label_dir else Path(t.data)
    dictionaries = [LabelDictionary(label_dir / f"dict.{name}.txt") for name in t.labels]
    num_classes = [len(d) for d in dictionaries]
    if m.num_classes and list(m.num_classes) != num_classes:
        raise ConfigError(f"model.num_classes={list(m.num_classes)} but the dictionaries in {label_dir} have "
                          f"{num_classes} classes; leave model.num_classes unset (it is read from them)")
    m.num_classes, m.label_rate = num_classes, t.label_rate

    model = HubertModel(m, sample_rate=t.sample_rate)
    objective = build_objective(cfg.criterion, m)
    train = dataset_for_split(cfg, cfg.dataset.train_subset, t.labels)
    check_label_lengths(train, t.labels, t.label_rate)
    valid = None
    if not cfg.dataset.disable_validation:
        valid = dataset_for_split(cfg, cfg.dataset.valid_subset, t.labels)
        check_label_lengths(valid, t.labels, t.label_rate)
    health = HealthMonitor(chance_accuracy=1.0 / min(num_classes),
                           start_update=min(max(2 * cfg.lr_scheduler.warmup_updates, 500), 5000))
    return TrainingSetup(
        model=model, objective=objective, train_data=train, valid_data=valid,
        collate=LabelCollater(dictionaries, t.label_rate, t.sample_rate, pad=t.enable_padding), health=health,
        find_unused_parameters=may_leave_parameters_unused(cfg),
        probe=pretraining_probe(cfg),
        summary=[f"labels: {', '.join(t.labels)} from {label_dir}, {num_classes} classes, {t.label_rate:g} labels/s "
                 f"(chance accuracy {1.0 / min(num_classes):.3f})"],
    )
