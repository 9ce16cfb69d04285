"""Fine-tuning tasks: each ``build_*(cfg) -> TrainingSetup`` plugs into :func:`speechssl.train.loop.run_training`.

* ``audio_finetuning`` (CTC ASR): :func:`speechssl.tasks.ctc.build_ctc_finetuning`
* ``speaker_id``: :func:`speechssl.tasks.speaker_id.build_speaker_id`
"""
