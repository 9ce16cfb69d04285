"""CTC decoding and scoring.

* :func:`greedy_decode` -- batched best-path decoding (the CTC collapse rules, vectorized);
* :func:`beam_decode` / :func:`prefix_beam_search` -- dependency-free prefix beam search;
* :class:`FlashlightDecoder` -- torchaudio's beam search with an optional lexicon and KenLM LM
  (needs ``pip install 'speechssl[decode]'``);
* :func:`score` / :func:`utterance_errors` -- WER / CER with jiwer.
"""

from speechssl.decode.beam import beam_decode, prefix_beam_search, sequence_log_prob
from speechssl.decode.flashlight import FlashlightDecoder
from speechssl.decode.greedy import collapse_mask, count_emitted, greedy_decode
from speechssl.decode.metrics import ErrorCounts, score, utterance_errors

__all__ = ["ErrorCounts", "FlashlightDecoder", "beam_decode", "collapse_mask", "count_emitted", "greedy_decode",
           "prefix_beam_search", "score", "sequence_log_prob", "utterance_errors"]
