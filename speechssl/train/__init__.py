"""Training machinery shared by pretraining and fine-tuning.

* :mod:`~speechssl.train.loop` -- launch (single / spawned / torchrun), resume, epochs, validation, saving;
  a task supplies a ``build(cfg) -> TrainingSetup`` (model, objective, datasets);
* :mod:`~speechssl.train.trainer` -- one optimizer update: accumulation, DDP, AMP, gradient
  normalization, clipping, non-finite handling;
* :mod:`~speechssl.train.optim`, :mod:`~speechssl.train.lr_scheduler` -- AdamW groups, LR schedules;
* :mod:`~speechssl.train.checkpoint` -- atomic checkpoints, rotation, RNG state, resume checks;
* :mod:`~speechssl.train.distributed` -- process groups, devices, collectives;
* :mod:`~speechssl.train.metrics`, :mod:`~speechssl.train.plot` -- logs, TensorBoard, alarms, plots.
"""
