"""No host-device synchronisation in a training step, counted on the CPU (speechssl.utils.device).

On a GPU, ``.item()`` / ``.tolist()`` / ``bool()``, boolean-mask indexing and ``torch.tensor(x, device=...)``
make the host wait until the device has run everything queued. :func:`count_host_reads` counts these calls
on any device; each sync-free path is also checked against the code it replaced (kept here as the oracle:
the same outputs as before).
"""

from __future__ import annotations

import dataclasses
import math
import pytest
import torch
import torch.nn.functional as F

from speechssl.cluster.kmeans import greedy_kmeans_plusplus
from speechssl.config import CriterionConfig
from speechssl.models import build_model, hubert_tiny_config, wav2vec2_tiny_config
from speechssl.models.masking import _span_lengths, compute_mask_indices, mask_positions, span_mask
from speechssl.objectives import build_objective
from speechssl.train.distributed import DistEnv
from speechssl.train.trainer import Trainer
from speechssl.utils.device import HostCopy, count_host_reads
from train_fixtures import toy_config

pytestmark = pytest.mark.usefixtures("one_thread")


def syncs(counts) -> dict[str, int]:
    """The reads that would stall a GPU (HostCopy reads wait only for the kernels before the copy)."""
    return {k: v for k, v in counts.items() if k != "host_copy" and v}


# --------------------------------------------------------------------------------------------------
# oracles: the code before the sync-free rewrite, verbatim
# --------------------------------------------------------------------------------------------------


def _old_keep_random_subset(mask, k, generator):
    keys = torch.rand(mask.shape, device=mask.device, generator=generator).masked_fill(~mask, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    k = torch.as_tensor(k, device=mask.device).reshape(-1, 1)
    return mask & (rank < k)


def old_compute_mask_indices(shape, padding_mask, mask_prob, mask_length, mask_type="static", mask_other=0.0,
                             min_masks=0, require_same_masks=True, mask_dropout=0.0, device=None, generator=None):
    B, L = shape
    if padding_mask is not None:
        device = padding_mask.device
    device = torch.device(device) if device is not None else torch.device("cpu")
    if mask_prob <= 0 or B == 0 or L == 0:
        return torch.zeros(B, L, dtype=torch.bool, device=device)

    def rand(*size):
        return torch.rand(size, device=device, generator=generator, dtype=torch.float64)

    if padding_mask is not None:
        sz = L - padding_mask.sum(dim=1)
    else:
        sz = torch.full((B,), L, dtype=torch.long, device=device)
    N = max(min_masks, int(mask_prob * L / mask_length + 1))
    num = (mask_prob * sz / mask_length + rand(B)).floor().long().clamp(min=min_masks, max=N)
    span_ids = torch.arange(N, device=device)
    in_use = span_ids < num[:, None]
    lengths = _span_lengths(mask_type, (B, N), mask_length, mask_other, device, generator) * in_use
    if mask_type != "static":
        empty = (lengths.sum(dim=1) == 0) & (num > 0)
        first = torch.minimum(torch.full_like(sz, mask_length), sz - 1).clamp(min=0)
        lengths[:, 0] = torch.where(empty, first, lengths[:, 0])
    min_len = lengths.masked_fill(~in_use, torch.iinfo(torch.long).max).min(dim=1).values
    starts_range = sz - min_len
    starts_range = torch.where(starts_range <= num, num + 1, starts_range)
    W = max(L, N + 1)
    keys = rand(B, W).masked_fill(torch.arange(W, device=device) >= starts_range[:, None], 2.0)
    starts = keys.topk(N, dim=1, largest=False).indices
    max_len = mask_length if mask_type == "static" else (
        2 * mask_length if mask_type == "uniform" else max(int(lengths.max()), 1))
    offsets = torch.arange(max_len, device=device)
    pos = starts[:, :, None] + offsets
    valid = (offsets < lengths[:, :, None]) & (pos < sz[:, None, None])
    pos = torch.where(valid, pos, L).reshape(B, -1)
    mask = torch.zeros(B, L + 1, dtype=torch.bool, device=device).scatter_(1, pos, True)[:, :L]
    counts = mask.sum(dim=1)
    fewest, most, full = torch.stack([counts.min(), counts.max(), (counts >= sz).any()]).tolist()
    if full:
        raise ValueError("too short")
    if require_same_masks and most > fewest:
        mask = _old_keep_random_subset(mask, fewest, generator)
        counts = torch.full_like(counts, fewest)
    if mask_dropout > 0:
        holes = (counts.double() * mask_dropout).round().long()
        mask = mask & ~_old_keep_random_subset(mask, holes, generator)
    return mask


def old_greedy_kmeans_plusplus(x, k, generator, n_local_trials=None):
    N, D = x.shape
    L = n_local_trials or 2 + int(math.log(k))
    dev = x.device
    x_sqnorm = x.float().pow(2).sum(1)
    idx = torch.empty(k, dtype=torch.long, device=dev)
    idx[0] = torch.randint(N, (1,), generator=generator, device=dev)
    closest = (x_sqnorm + x_sqnorm[idx[0]] - 2.0 * (x @ x[idx[0]]).float()).clamp_(min=0.0)
    for c in range(1, k):
        cum = torch.cumsum(closest, 0, dtype=torch.float64)
        r = torch.rand(L, generator=generator, device=dev, dtype=torch.float64) * cum[-1]
        cand = torch.searchsorted(cum, r).clamp_(max=N - 1)
        d = (x @ x[cand].T).float()
        d.mul_(-2.0).add_(x_sqnorm[:, None]).add_(x_sqnorm[cand][None, :])
        torch.minimum(d, closest[:, None], out=d)
        best = torch.argmin(d.sum(0))
        closest = d[:, best].clamp(min=0.0)
        idx[c] = cand[best]
    return idx


# --------------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------------


def padding(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("mask_type,other", [("static", 0.0), ("uniform", 2.0), ("normal", 3.0), ("poisson", 0.0)])
@pytest.mark.parametrize("same,dropout", [(True, 0.0), (False, 0.0), (False, 0.2)])
def test_span_mask_reads_nothing_and_equals_the_old_masking(mask_type, other, same, dropout):
    pad = padding([120, 90, 61, 120], 120)
    for seed in range(8):
        kwargs = dict(mask_type=mask_type, mask_other=other, min_masks=2, require_same_masks=same,
                      mask_dropout=dropout)
        old = old_compute_mask_indices((4, 120), pad, 0.65, 10, generator=torch.Generator().manual_seed(seed),
                                       **kwargs)
        with count_host_reads() as reads:
            new, covered = span_mask((4, 120), pad, 0.65, 10, generator=torch.Generator().manual_seed(seed), **kwargs)
        assert not reads
        assert torch.equal(new, old) and covered.tolist() == [-1] * 4
        with count_host_reads() as reads:
            checked = compute_mask_indices((4, 120), pad, 0.65, 10, generator=torch.Generator().manual_seed(seed),
                                           **kwargs)
        assert torch.equal(checked, old) and dict(reads) == {"host_copy": 1}


def test_same_masks_with_dropout_equals_the_old_masking_when_counts_differ():
    """With require_same_masks the new code always draws the subset's keys (the old one skipped them when
    every row already had the same count: not known on the host); otherwise the same random stream."""
    pad = padding([120, 90, 61], 120)
    for seed in range(8):
        old = old_compute_mask_indices((3, 120), pad, 0.65, 10, min_masks=2, mask_dropout=0.1,
                                       generator=torch.Generator().manual_seed(seed))
        new = compute_mask_indices((3, 120), pad, 0.65, 10, min_masks=2, mask_dropout=0.1,
                                   generator=torch.Generator().manual_seed(seed))
        assert torch.equal(new, old)


def test_too_short_rows_are_reported_as_before():
    for seed in range(20):
        try:
            old_compute_mask_indices((64, 8), None, 0.65, 10, min_masks=2, generator=torch.Generator().manual_seed(seed))
            old_raised = False
        except ValueError:
            old_raised = True
        _, covered = span_mask((64, 8), None, 0.65, 10, min_masks=2, generator=torch.Generator().manual_seed(seed))
        assert (max(covered.tolist()) >= 0) == old_raised
        assert set(covered.tolist()) <= {-1, 8}


def test_mask_positions_gather_equals_boolean_indexing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 4, generator=g)
    mask = compute_mask_indices((3, 50), None, 0.5, 5, min_masks=2, generator=g)
    M = int(mask.sum(1)[0])
    with count_host_reads() as reads:
        idx = mask_positions(mask, M)
        gathered = x.gather(1, idx[..., None].expand(-1, -1, 4))
    assert not reads and torch.equal(gathered, x[mask].view(3, M, 4))
    sel = torch.rand(3, 50, generator=g) < 0.3  # rows of different counts: flat selection
    flat = mask_positions(sel.reshape(-1), int(sel.sum()))
    assert torch.equal(x.reshape(-1, 4).index_select(0, flat), x[sel])


# --------------------------------------------------------------------------------------------------
# models and objectives
# --------------------------------------------------------------------------------------------------


def test_wav2vec2_step_reads_the_mask_counts_once_and_equals_boolean_selection():
    torch.manual_seed(0)
    cfg = wav2vec2_tiny_config()
    model = build_model(cfg).train()
    objective = build_objective(CriterionConfig(), cfg)
    source, pad = torch.randn(3, 8000), padding([8000, 6000, 7000], 8000)
    with count_host_reads() as reads:
        out = objective(model, {"source": source, "padding_mask": pad})
        (out.loss / out.sample_size).backward()
    assert syncs(reads) == {} and reads["host_copy"] == 1
    assert isinstance(out.sample_size, int)
    # oracle: the boolean-mask selection the model used before (eval: no dropout, argmax codes)
    model.eval()
    with torch.no_grad():
        res = model(source, pad, mask_indices=None)
        mask = res["mask_indices"]
        B, M = res["pred"].shape[:2]
        torch.testing.assert_close(res["pred"], model.final_proj(res["x"][mask].view(B, M, -1)), rtol=0, atol=0)
        q = model.quantizer(res["features"][mask].view(B, M, -1))
        torch.testing.assert_close(res["targets"], model.project_q(q["x"]), rtol=0, atol=0)
        assert torch.equal(res["codes"], q["codes"])


def test_too_short_input_is_still_an_error_in_the_model():
    model = build_model(dataclasses.replace(wav2vec2_tiny_config(), mask_length=10)).train()
    with pytest.raises(ValueError, match="too short"):
        for _ in range(10):  # covering every frame is random; 2 frames of 10-frame spans always are
            model(torch.randn(4, 1000), features_only=True)


@pytest.mark.parametrize("nomask_weight", [0.0, 0.5])
def test_hubert_step_reads_once_skips_unused_logits_and_equals_boolean_selection(nomask_weight):
    torch.manual_seed(0)
    cfg = hubert_tiny_config()
    model = build_model(cfg).train()
    objective = build_objective(CriterionConfig(name="hubert", pred_nomask_weight=nomask_weight,
                                                loss_weights=[10.0]), cfg)
    source, pad = torch.randn(2, 8000), padding([8000, 6100], 8000)
    labels = torch.randint(0, 8, (2, 25))
    labels[1, 20:] = -1  # padding of a shorter utterance's labels: never scored
    with count_host_reads() as reads:
        out = objective(model, {"source": source, "padding_mask": pad, "target_list": [labels]})
        (out.loss / out.sample_size).backward()
    assert syncs(reads) == {} and reads["host_copy"] == 1 and isinstance(out.sample_size, int)
    assert ("loss_u" in out.logs) == (nomask_weight > 0)
    # oracle: logits of the boolean selections
    model.eval()
    with torch.no_grad():
        res = model(source, pad, target_list=[labels], skip_nomask=nomask_weight == 0)
        valid = ~res["padding_mask"] & (labels[:, : res["x"].shape[1]] >= 0)
        for kind, sel in (("m", valid & res["mask_indices"]), ("u", valid & ~res["mask_indices"])):
            if kind == "u" and nomask_weight == 0:
                assert res["logit_u_list"] == [None]
                continue
            ref = model.label_logits(model.final_proj(res["x"][sel]), 0)
            torch.testing.assert_close(res[f"logit_{kind}_list"][0], ref, rtol=0, atol=0)
            assert torch.equal(res[f"target_{kind}_list"][0], labels[:, : sel.shape[1]][sel])


def test_ctc_loss_of_padded_targets_equals_the_concatenated_targets():
    from speechssl.models.ctc import build_ctc_model
    from speechssl.objectives.ctc import CtcCriterion
    from speechssl.text.vocab import BLANK, PAD, Vocabulary

    torch.manual_seed(0)
    vocab = Vocabulary(["<s>", "<pad>", "</s>", "<unk>", "|", "A", "B"], "letter")
    model = build_ctc_model(wav2vec2_tiny_config(), len(vocab)).train()
    target = torch.tensor([[5, 6, 4, 5], [6, 4, PAD, PAD], [5, 5, 5, PAD]])
    lengths = torch.tensor([4, 2, 3])
    batch = {"source": torch.randn(3, 8000), "padding_mask": padding([8000, 5000, 6500], 8000),
             "target": target, "target_lengths": lengths}
    torch.manual_seed(1)
    with count_host_reads() as reads:
        out = CtcCriterion(vocab)(model, batch)
    assert syncs(reads) == {} and reads["host_copy"] == 1  # the mask check (ctc_loss's own copy of the
    # lengths to the host happens inside ATen, invisible here)
    grads = torch.autograd.grad(out.loss, list(model.proj.parameters()))
    torch.manual_seed(1)  # oracle: the same forward, ctc_loss of target[target != PAD]
    net = model(batch["source"], batch["padding_mask"])
    lprobs = F.log_softmax(net["logits"].float(), dim=-1).transpose(0, 1)
    ref = F.ctc_loss(lprobs, target[target != PAD], net["lengths"], lengths, blank=BLANK, reduction="sum",
                     zero_infinity=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref, list(model.proj.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# trainer and k-means
# --------------------------------------------------------------------------------------------------


def test_trainer_update_reads_the_device_twice_whatever_the_micro_batches():
    torch.manual_seed(0)
    cfg = wav2vec2_tiny_config()
    trainer = Trainer(toy_config(), build_model(cfg), build_objective(CriterionConfig(), cfg), DistEnv())
    g = torch.Generator().manual_seed(0)
    batches = [{"source": torch.randn(2, 6000, generator=g), "padding_mask": None, "audio_samples": 12000}
               for _ in range(3)]
    with count_host_reads() as reads:
        stats = trainer.train_step(batches)
    # one read of the all-reduced stats and one of the gradient norm per update; the mask counts once per
    # micro-batch through HostCopy (overlapped with the encoder on a GPU)
    assert syncs(reads) == {"tolist": 1, "item": 1} and reads["host_copy"] == 3
    assert not stats["skipped"] and stats["nsentences"] == 6 and stats["audio_samples"] == 36000
    assert stats["sample_size"] == stats["num_masked"] > 0 and math.isfinite(stats["loss"])


def test_host_copy_reads_values():
    t = torch.arange(6).view(2, 3)
    copy = HostCopy(t * 2)
    assert copy.get() == [[0, 2, 4], [6, 8, 10]] and copy.get() is copy.get()


def test_kmeans_seeding_reads_nothing_and_picks_the_same_centres():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) + torch.randint(0, 5, (500, 1), generator=g).float() * 3
    for seed in range(3):
        old = old_greedy_kmeans_plusplus(x, 20, torch.Generator().manual_seed(seed))
        with count_host_reads() as reads:
            new = greedy_kmeans_plusplus(x, 20, torch.Generator().manual_seed(seed))
        assert not reads and torch.equal(new, old)
        with count_host_reads() as reads:
            old_greedy_kmeans_plusplus(x, 20, torch.Generator().manual_seed(seed))
        assert reads["item"] >= 20  # what the old code read per pick (the counter sees it)
