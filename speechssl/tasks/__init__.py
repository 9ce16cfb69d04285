"""Every task in one place: each ``build_*(cfg) -> TrainingSetup`` plugs into
:func:`speechssl.train.loop.run_training`, its evaluation lives beside it, and the command modules
(:mod:`speechssl.pretrain`, :mod:`speechssl.finetune`, :mod:`speechssl.evaluate`, :mod:`speechssl.probe`) only
dispatch to them.

* wav2vec 2.0 pretraining (``audio_pretraining``): :func:`speechssl.tasks.wav2vec2.build_wav2vec2_pretraining`
* data2vec 2.0 pretraining (``audio_pretraining`` with ``model.name: data2vec2``):
  :func:`speechssl.tasks.data2vec2.build_data2vec2_pretraining`
* HuBERT pretraining (``hubert_pretraining``): :func:`speechssl.tasks.hubert.build_hubert_pretraining`
* what the pretraining tasks share (DDP's unused parameters, the probe during pretraining):
  :mod:`speechssl.tasks.pretraining`
* CTC ASR fine-tuning (``audio_finetuning``): :func:`speechssl.tasks.ctc.build_ctc_finetuning`; evaluation
  (decoding, WER/CER): :func:`speechssl.tasks.ctc_eval.evaluate_ctc`
* speaker ID (``speaker_id``): :func:`speechssl.tasks.speaker_id.build_speaker_id`; evaluation (accuracy, EER):
  :func:`speechssl.tasks.speaker_id_eval.evaluate_speaker_id`
* frozen-upstream probes (``speechssl probe``, and ``probe.*`` during pretraining): :mod:`speechssl.tasks.probe`
"""
