"""Gumbel-softmax product quantizer (wav2vec 2.0 targets), fairseq's ``GumbelVectorQuantizer`` semantics.

``G`` groups x ``V`` entries; each group picks one codevector of dim ``vq_dim / G`` and the picks are
concatenated. Selection is by index (``codebook[g, idx]``), never by multiplying a one-hot with the whole
codebook: the straight-through gradient (hard one-hot forward, soft gumbel-softmax backward) is written
out in :class:`_StraightThroughLookup`, which costs two small batched matmuls in backward (IEEE fp32, never
TF32). ``weight_proj`` runs in the model's precision (autocast's bf16 / fp16, as in fairseq's fp16 runs);
everything after it in fp32.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from speechssl.utils.device import ieee_fp32


def _one_hot(idx: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot(idx, num_classes).to(dtype)`` by a scatter: ``F.one_hot`` reads ``idx.min()`` / ``idx.max()``
    on the host to check them (on the CPU; a scatter of an index out of range fails anyway)."""
    return torch.zeros(*idx.shape, num_classes, dtype=dtype, device=idx.device).scatter_(-1, idx.unsqueeze(-1), 1.0)


class _StraightThroughLookup(torch.autograd.Function):
    """``q[n, g] = codebook[g, idx[n, g]]`` forward; gradients as if ``q = onehot_st @ codebook`` with
    ``onehot_st = hard - soft.detach() + soft`` (fairseq's ``gumbel_softmax(hard=True)``).

    soft: ``(N, G, V)`` fp32 gumbel-softmax probabilities; codebook: ``(G, V, d)``; idx: ``(N, G)``.
    Returns ``(N, G, d)``.
    """

    @staticmethod
    def forward(ctx, soft: Tensor, codebook: Tensor, idx: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(codebook, idx)
        ctx.num_vars = soft.shape[-1]
        groups = torch.arange(codebook.shape[0], device=idx.device)
        return codebook[groups, idx]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        codebook, idx = ctx.saved_tensors
        g = grad.float().transpose(0, 1)  # (G, N, d)
        with ieee_fp32():
            grad_soft = torch.bmm(g, codebook.float().transpose(1, 2)).transpose(0, 1)  # (N, G, V)
            onehot = _one_hot(idx, ctx.num_vars, g.dtype).permute(1, 2, 0)  # (G, V, N)
            grad_codebook = torch.bmm(onehot, g).to(codebook.dtype)  # (G, V, d)
        return grad_soft, grad_codebook, None


def _average(probs: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``(N, G, V)`` -> ``(G, V)`` mean over the rows with weight 1 (all rows when ``weights`` is None)."""
    if weights is None:
        return probs.mean(dim=0)
    return (probs * weights).sum(dim=0) / weights.sum().clamp(min=1.0)


def _perplexity(probs: Tensor) -> Tensor:
    """``sum_g exp(H(probs[g]))`` for ``(G, V)`` marginals (fairseq adds 1e-7 inside the log)."""
    return torch.exp(-torch.sum(probs * torch.log(probs + 1e-7), dim=-1)).sum()


class GumbelVectorQuantizer(nn.Module):
    """Product quantizer with Gumbel-softmax selection. ``(..., dim) -> (..., vq_dim)``.

    Args:
        dim: input feature dim (conv channels ``C``).
        num_vars: entries per group ``V`` (320 for BASE).
        groups: ``G`` (2).
        vq_dim: output dim; each group's codevector has ``vq_dim / G``.
        temp: ``(start, end, decay)``: temperature ``max(start * decay**num_updates, end)``.

    Parameters (fairseq / transformers names and shapes): ``vars`` ``(1, G*V, vq_dim/G)`` ~ U(0, 1)
    (transformers: ``codevectors``), ``weight_proj`` ``Linear(dim, G*V)`` with weight ~ N(0, 1), bias 0.

    forward(x, padding_mask=None) returns a dict (``padding_mask`` ``x.shape[:-1]`` bool, True = padded
    frame, excluded from the perplexities):
        ``x`` ``(..., vq_dim)`` fp32 codevectors (training: hard straight-through gumbel-softmax sample at
        the current temperature; eval: argmax), ``codes`` ``(..., G)`` selected indices,
        ``code_perplexity`` (of the argmax codes before gumbel noise, in training too, as fairseq) and ``prob_perplexity`` (of the batch-averaged
        softmax, no gumbel noise) as fp32 scalars, ``num_vars`` = ``G*V``, ``temp`` (float).
    """

    def __init__(self, dim: int, num_vars: int, groups: int, vq_dim: int,
                 temp: tuple[float, float, float] = (2.0, 0.5, 0.999995)):
        super().__init__()
        if vq_dim % groups:
            raise ValueError(f"quantizer dim ({vq_dim}) must be divisible by model.latent_groups ({groups})")
        if len(temp) != 3:
            raise ValueError(f"model.latent_temp must be (start, end, decay), got {temp}")
        self.groups = groups
        self.num_vars = num_vars
        self.vars = nn.Parameter(torch.empty(1, groups * num_vars, vq_dim // groups).uniform_())
        self.weight_proj = nn.Linear(dim, groups * num_vars)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.max_temp, self.min_temp, self.temp_decay = (float(t) for t in temp)
        self.curr_temp = self.max_temp

    def set_num_updates(self, num_updates: int) -> None:
        self.curr_temp = max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> dict[str, Any]:
        lead = x.shape[:-1]
        G, V = self.groups, self.num_vars
        logits = self.weight_proj(x.reshape(-1, x.shape[-1]))
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = logits.float().view(-1, G, V)  # (N, G, V)
            codebook = self.vars.view(G, V, -1)
            hard_idx = logits.argmax(dim=-1)  # (N, G): the codes without gumbel noise
            if self.training:
                gumbels = -torch.empty_like(logits).exponential_().log()
                soft = ((logits + gumbels) / self.curr_temp).softmax(dim=-1)
                idx = soft.argmax(dim=-1)  # (N, G)
                q = _StraightThroughLookup.apply(soft, codebook, idx)
            else:
                idx = hard_idx
                q = codebook[torch.arange(G, device=idx.device), idx]
            weights = None if padding_mask is None else (~padding_mask).reshape(-1, 1, 1).float()
            with torch.no_grad():
                # fairseq: the argmax of the logits before the gumbel noise, in training too. The sampled
                # codes follow the softmax (their perplexity tracks prob_perplexity), so they would hide
                # a codebook whose argmax uses a handful of entries.
                code_ppl = _perplexity(_average(_one_hot(hard_idx, V, torch.float32), weights))
            prob_ppl = _perplexity(_average(logits.softmax(dim=-1), weights))
        return {
            "x": q.reshape(*lead, -1),
            "codes": idx.view(*lead, G),
            "code_perplexity": code_ppl,
            "prob_perplexity": prob_ppl,
            "num_vars": G * V,
            "temp": self.curr_temp,
        }
