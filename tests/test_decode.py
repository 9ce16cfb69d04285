"""Greedy CTC collapse rules, prefix beam search vs greedy, vocabularies (letters, sentencepiece), WER/CER."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from speechssl.decode import beam_decode, greedy_decode, prefix_beam_search, score, sequence_log_prob
from speechssl.decode.greedy import count_emitted
from speechssl.text.vocab import UNK, Vocabulary, VocabError


def test_greedy_collapse_rules():
    ids = torch.tensor([[1, 1, 0, 1, 2, 2, 0, 0, 3],   # merge repeats, a blank separates two 1s
                        [0, 0, 0, 0, 0, 0, 0, 0, 0],   # only blanks -> nothing
                        [2, 2, 2, 2, 3, 3, 1, 1, 1]])  # padded after 4 frames
    out = greedy_decode(ids, torch.tensor([9, 9, 4]))
    assert out == [[1, 1, 2, 3], [], [2]]
    assert int(count_emitted(ids, torch.tensor([9, 9, 4]))) == 5


def test_greedy_from_logits_matches_argmax_path():
    torch.manual_seed(0)
    logits = torch.randn(3, 20, 6)
    expected = []
    for row in logits.argmax(-1).tolist():
        seq, prev = [], None
        for i in row:
            if i != prev and i != 0:
                seq.append(i)
            prev = i
        expected.append(seq)
    assert greedy_decode(logits) == expected


def test_beam_beats_greedy_on_constructed_case():
    # each frame: blank 0.6, "a" 0.4. Best path = two blanks (p 0.36, empty output), but "a" has
    # p = 0.4*0.6 + 0.6*0.4 + 0.4*0.4 = 0.64 summed over its alignments.
    lp = torch.log(torch.tensor([[0.6, 0.4], [0.6, 0.4]]))
    greedy = greedy_decode(lp[None])[0]
    best, logp = prefix_beam_search(lp, beam_size=4)[0]
    assert greedy == [] and best == [1]
    assert logp == pytest.approx(math.log(0.64), abs=1e-6)
    assert sequence_log_prob(lp, best) > sequence_log_prob(lp, greedy)


def test_beam_never_less_probable_than_greedy():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        lp = torch.log_softmax(2.0 * torch.randn(12, 5, generator=gen), dim=-1)
        greedy = greedy_decode(lp[None])[0]
        beam = beam_decode(lp[None], beam_size=16)[0]
        assert sequence_log_prob(lp, beam) >= sequence_log_prob(lp, greedy) - 1e-5


def test_beam_reported_score_is_the_sequence_probability():
    lp = torch.log_softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    # pruned: a lower bound of the summed alignment probability
    for labels, logp in prefix_beam_search(lp, beam_size=8, token_beam=4)[:5]:
        assert logp <= sequence_log_prob(lp, labels) + 1e-5
    # no pruning: exact
    for labels, logp in prefix_beam_search(lp[:5], beam_size=10_000, token_beam=4)[:5]:
        assert logp == pytest.approx(sequence_log_prob(lp[:5], labels), abs=1e-5)


def test_letter_vocabulary_round_trip(tmp_path):
    d = tmp_path / "dict.ltr.txt"
    d.write_text("| 10\nE 5\nH 3\nI 3\nO 2\nU 2\nY 1\n")
    v = Vocabulary.from_dict_file(d)
    assert v.symbols[:5] == ["<s>", "<pad>", "</s>", "<unk>", "|"]
    ids = v.encode("H I | Y O U |")
    assert v.decode(ids) == "HI YOU"
    assert v.encode("H Z |")[1] == UNK
    assert v.decode(v.encode("H Z |")) == "H"  # <unk> is not printed
    with pytest.raises(VocabError, match="dict.ltr.txt"):
        Vocabulary.from_dict_file(tmp_path / "missing" / "dict.ltr.txt")


def test_vocabulary_in_a_transformers_tokenizers_layout():
    """Blank first, the tokenizer's own specials (task.vocab_specials) wherever they are: decoding drops them,
    unknown symbols encode as its unk token."""
    symbols = ["[PAD]", "a", "b", "|", "[UNK]", "<s>", "</s>"]
    v = Vocabulary(symbols, "letter", specials=["[PAD]", "[UNK]", "<s>", "</s>"])
    assert v.decode([1, 4, 2, 3, 5, 1, 6]) == "ab a"
    assert v.encode("a | z") == [1, 3, 4]
    with pytest.raises(VocabError, match="pad token .* first"):
        Vocabulary(symbols[1:], "letter", specials=["[PAD]", "[UNK]", "<s>", "</s>"])
    with pytest.raises(VocabError, match="must start with <s>"):
        Vocabulary(symbols, "letter")


def test_sentencepiece_round_trip_and_cli(tmp_path, capsys):
    from speechssl.cli import main

    words = ["THE", "QUICK", "BROWN", "FOX", "JUMPS", "OVER", "LAZY", "DOG", "SPEECH", "MODEL", "LEARNS", "FAST"]
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 7)) for i in range(200)]
    wrd = tmp_path / "train.wrd"
    wrd.write_text("\n".join(lines) + "\n")
    prefix = tmp_path / "spm" / "unigram40"
    assert main(["spm", "train", str(wrd), "--out", str(prefix), "--vocab-size", "40"]) == 0
    model = prefix.with_name("unigram40.model")
    assert model.is_file() and prefix.with_name("unigram40.vocab").is_file()
    v = Vocabulary.from_spm(model)
    assert v.kind == "sentencepiece" and v.symbols[0] == "<s>"
    for text in ["THE QUICK BROWN FOX", "LAZY DOG LEARNS FAST", "SPEECH"]:
        ids = v.encode(text)
        assert UNK not in ids and v.decode(ids) == text
    # stored symbols alone decode (no model file needed at evaluation)
    v2 = Vocabulary.for_labels("wrd", v.symbols)
    assert v2.decode(v.encode("THE QUICK BROWN FOX")) == "THE QUICK BROWN FOX"
    # never overwrites without --force
    assert main(["spm", "train", str(wrd), "--out", str(prefix), "--vocab-size", "40"]) == 2
    assert "--force" in capsys.readouterr().out
    assert main(["spm", "train", str(wrd), "--out", str(prefix), "--vocab-size", "40", "--force"]) == 0


def test_wer_cer():
    s = score(["A B C", "D E"], ["A X C", ""])
    assert s["wer"] == pytest.approx(60.0) and s["word_errors"] == 3 and s["words"] == 5
    assert s["cer"] == pytest.approx(50.0) and s["num_utterances"] == 2
    assert score(["A B"], ["A B"])["wer"] == 0.0


def _flashlight_available() -> bool:
    try:
        import flashlight.lib.text  # noqa: F401
    except ImportError:
        return False
    return True


ARPA = "\n".join([  # KenLM wants tabs between probability, words and backoff
    "\\data\\", "ngram 1=5", "ngram 2=2", "",
    "\\1-grams:", "-99\t<s>\t-0.3", "-1.0\t</s>\t0", "-0.5\tAB\t-0.3", "-0.5\tCAB\t-0.3", "-2.0\t<unk>\t0", "",
    "\\2-grams:", "-0.1\t<s> AB", "-0.1\tAB CAB", "",
    "\\end\\", ""])


@pytest.mark.skipif(not _flashlight_available(), reason="flashlight-text not installed (pip install speechssl[decode])")
def test_flashlight_lexicon_decoding(tmp_path):
    from speechssl.decode import FlashlightDecoder

    d = tmp_path / "dict.ltr.txt"
    d.write_text("| 4\nA 3\nB 2\nC 1\n")
    v = Vocabulary.from_dict_file(d)
    # frames spell "A B | C A B |" clearly, but with "C" nearly tied with "B" in the first word
    seq = ["A", "B", "|", "C", "A", "B", "|"]
    logits = torch.full((1, 2 * len(seq), len(v)), -5.0)
    for i, s in enumerate(seq):
        logits[0, 2 * i, v.index[s]] = 5.0
        logits[0, 2 * i + 1, 0] = 5.0
    logits[0, 2, v.index["C"]] = 4.9
    free = FlashlightDecoder(v, beam_size=10)
    assert free(logits) == ["AB CAB"]
    lex = tmp_path / "lexicon.txt"
    lex.write_text("AB A B |\nCAB C A B |\n")
    assert FlashlightDecoder(v, lexicon=str(lex), beam_size=10)(logits) == ["AB CAB"]
    # with a KenLM bigram model (ARPA) over the lexicon's words
    arpa = tmp_path / "lm.arpa"
    arpa.write_text(ARPA)
    assert FlashlightDecoder(v, lexicon=str(lex), lm=str(arpa), beam_size=10, lm_weight=0.5)(logits) == ["AB CAB"]


def test_flashlight_missing_gives_install_hint(monkeypatch):
    from speechssl import _torchaudio

    monkeypatch.setitem(sys.modules, "flashlight.lib.text", None)
    monkeypatch.setitem(sys.modules, "flashlight", None)
    with pytest.raises(_torchaudio.DecoderUnavailable, match="flashlight-text"):
        _torchaudio.ctc_beam_decoder(["<s>", "a"])
