"""speechssl: self-supervised speech representation learning (wav2vec 2.0, HuBERT) and fine-tuning."""

__version__ = "0.1.0"
