"""Output vocabularies of CTC fine-tuning: letters (``.ltr`` + ``dict.ltr.txt``) and sentencepiece units."""

from speechssl.text.vocab import BLANK, PAD, SPECIALS, UNK, Vocabulary

__all__ = ["BLANK", "PAD", "SPECIALS", "UNK", "Vocabulary"]
