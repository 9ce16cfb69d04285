"""Speaker-ID scoring: EER, verification trials, top-k accuracy, confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from speechssl.tasks.speaker_id_eval import (
    compute_eer,
    confusion_matrix,
    cosine_scores,
    draw_trials,
    topk_accuracy,
)


def test_eer_small_cases():
    assert compute_eer(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool))[0] == pytest.approx(0.5)
    eer, threshold = compute_eer(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0], bool))
    assert eer == 0.0 and 1.0 <= threshold <= 2.0
    assert compute_eer(np.array([0.0, 1.0]), np.array([1, 0], bool))[0] == pytest.approx(1.0)
    assert compute_eer(np.zeros(6), np.array([1, 0, 1, 0, 1, 0], bool))[0] == pytest.approx(0.5)  # all tied
    with pytest.raises(ValueError, match="non-target"):
        compute_eer(np.ones(3), np.ones(3, bool))


def test_eer_of_two_gaussians_matches_theory():
    rng = np.random.default_rng(0)
    n = 20000
    scores = np.r_[rng.normal(1.0, 1.0, n), rng.normal(-1.0, 1.0, n)]
    is_target = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    eer, threshold = compute_eer(scores, is_target)
    assert eer == pytest.approx(0.158655, abs=0.006)  # Phi(-1)
    assert abs(threshold) < 0.05


def test_trials_are_seeded_and_well_formed():
    speakers = np.repeat(np.arange(5), [1, 2, 3, 4, 6])
    np.random.default_rng(1).shuffle(speakers)
    a, b, is_target = draw_trials(speakers, 1001, seed=7)
    assert len(a) == len(b) == 1001 and is_target.sum() == 500
    assert (speakers[a[is_target]] == speakers[b[is_target]]).all() and (a[is_target] != b[is_target]).all()
    assert (speakers[a[~is_target]] != speakers[b[~is_target]]).all()
    assert set(speakers[a[is_target]]) == {1, 2, 3, 4}  # the single-utterance speaker has no target trial
    a2, b2, _ = draw_trials(speakers, 1001, seed=7)
    assert (a2 == a).all() and (b2 == b).all()
    assert not (draw_trials(speakers, 1001, seed=8)[1] == b).all()
    with pytest.raises(ValueError, match="2 speakers"):
        draw_trials(np.zeros(4, int), 10, 0)


def test_eer_on_constructed_embeddings():
    rng = np.random.default_rng(0)
    speakers = np.repeat(np.arange(20), 10)
    centers = rng.standard_normal((20, 32))
    a, b, is_target = draw_trials(speakers, 4000, seed=0)
    tight = centers[speakers] + 0.2 * rng.standard_normal((200, 32))
    eer_tight, _ = compute_eer(cosine_scores(tight, a, b), is_target)
    noise = rng.standard_normal((200, 32))
    eer_noise, _ = compute_eer(cosine_scores(noise, a, b), is_target)
    assert eer_tight < 0.01
    assert 0.4 < eer_noise < 0.6
    np.testing.assert_allclose(cosine_scores(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]), np.array([0, 0]),
                                             np.array([1, 2])), [1.0, 0.0])


def test_topk_and_confusion():
    logits = np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    targets = np.array([0, 1, 1])
    assert topk_accuracy(logits, targets, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, targets, 2) == pytest.approx(1.0)
    assert topk_accuracy(logits, targets, 5) == 1.0  # k capped at the number of classes
    cm = confusion_matrix(targets, logits.argmax(1), 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 0, 1], [0, 0, 0]])
