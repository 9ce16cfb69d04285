"""Speaker identification on top of a wav2vec 2.0 / HuBERT upstream (SUPERB's SID downstream).

Data flow of :class:`SpeakerIdModel` (``B`` batch, ``T`` samples, ``L`` frames, ``D`` model dim,
``N = encoder_layers + 1`` hidden states, ``S`` speakers)::

    source (B, T) --upstream--> hidden states N x (B, L, D)     (see :func:`upstream_hidden_states`)
        --softmax(layer_weights)-weighted sum--> (B, L, D)      (SUPERB's featurizer)
        --projector Linear(D, P)--> (B, L, P)                   (s3prl's projector_dim)
        --pooling over valid frames--> embedding (B, E)        (mean: E = P; attentive: E = 2P)
        --dropout, classifier Linear(E, S)--> logits (B, S)

Two training modes (``model.freeze_upstream``):

* frozen (SUPERB): only the head learns; the upstream stays in eval mode (no dropout, no masking)
  and runs without autograd, so its parameters never change and never get gradients;
* full fine-tuning: the conv feature extractor stays frozen, the Transformer is trained once
  ``freeze_finetune_updates`` updates are done (before that it runs without autograd, as fairseq's
  ``Wav2VecEncoder``), with masking (``apply_mask``) and LayerDrop as configured.

The speaker names (the lines of ``dict.spk.txt`` the model was trained with) are part of the
state dict (``_extra_state``), so a checkpoint maps class indices to speakers on its own.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.models.components import Dropout

POOLINGS = ("mean", "attentive")


def upstream_hidden_states(upstream: nn.Module, source: Tensor, padding_mask: Optional[Tensor] = None,
                           mask: bool = False) -> tuple[list[Tensor], Optional[Tensor]]:
    """The ``encoder_layers + 1`` hidden states SUPERB's weighted sum runs over, as s3prl collects them.

    State 0 is the Transformer's input (after the positional convolution, the post-LN LayerNorm and
    dropout: the input of the first layer); state ``i`` is the output of layer ``i``; the last state is
    the encoder's final output (the same as the last layer's for post-LN models, after the final
    LayerNorm for pre-LN ones). A layer skipped by LayerDrop repeats the previous state, so the count is
    fixed. Captured with forward hooks on ``encoder.dropout`` and ``encoder.layers``, so the upstream's
    own ``forward(source, padding_mask, mask=..., features_only=True)`` runs unchanged (wav2vec 2.0 and
    HuBERT alike).

    Args:
        source: ``(B, T)`` waveform; padding_mask: ``(B, T)`` bool, True at padded samples, or None.
    Returns ``(states, frame_padding_mask)``: ``N x (B, L, D)`` and ``(B, L)`` bool or None.
    """
    encoder = upstream.encoder
    inputs: list[Tensor] = []
    outputs: dict[int, Tensor] = {}
    handles = [encoder.dropout.register_forward_hook(lambda _m, _i, out: inputs.append(out))]
    for index, layer in enumerate(encoder.layers):
        handles.append(layer.register_forward_hook(
            lambda _m, _i, out, index=index: outputs.__setitem__(index, out)))
    try:
        out = upstream(source, padding_mask, mask=mask, features_only=True)
    finally:
        for handle in handles:
            handle.remove()
    if len(inputs) != 1:
        raise RuntimeError(f"expected one call of the upstream's encoder.dropout, saw {len(inputs)}")
    states = [inputs[0]]
    for index in range(len(encoder.layers)):
        states.append(outputs.get(index, states[-1]))
    states[-1] = out["x"]
    return states, out["padding_mask"]


class WeightedLayerSum(nn.Module):
    """SUPERB's featurizer: ``sum_i softmax(w)_i * states[i]``, weights initialised equal.

    ``N x (B, L, D) -> (B, L, D)``; ``weights`` is the learnable ``(N,)`` parameter.
    """

    def __init__(self, num_states: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_states))

    def forward(self, states: list[Tensor]) -> Tensor:
        if len(states) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} hidden states, got {len(states)}")
        stacked = torch.stack(states, dim=0)  # (N, B, L, D)
        w = self.weights.softmax(dim=0).to(stacked.dtype)
        return torch.einsum("n,nbld->bld", w, stacked)


def _valid_frames(x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """``(B, L, 1)`` float weights: 1 at valid frames, 0 at padded ones."""
    if padding_mask is None:
        return x.new_ones(x.shape[0], x.shape[1], 1)
    return (~padding_mask).unsqueeze(-1).to(x.dtype)


class MeanPooling(nn.Module):
    """Mean over the valid frames. ``(B, L, P), (B, L) -> (B, P)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        valid = _valid_frames(x, padding_mask)
        return (x * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


class AttentiveStatsPooling(nn.Module):
    """Attentive statistics pooling (Okabe et al., 2018). ``(B, L, P), (B, L) -> (B, 2P)``.

    Frame scores ``e = v^T tanh(W x + b)``, softmax over the valid frames, then the weighted mean and
    the weighted standard deviation ``sqrt(max(E[x^2] - mean^2, 1e-5))`` concatenated.
    """

    def __init__(self, dim: int, attention_dim: int = 128):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), nn.Linear(attention_dim, 1))
        self.out_dim = 2 * dim

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        scores = self.attention(x).float()  # (B, L, 1)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask.unsqueeze(-1), float("-inf"))
        alpha = scores.softmax(dim=1)
        xf = x.float()
        mean = (alpha * xf).sum(dim=1)
        var = (alpha * xf.square()).sum(dim=1) - mean.square()
        return torch.cat([mean, var.clamp(min=1e-5).sqrt()], dim=-1).to(x.dtype)


class SpeakerHead(nn.Module):
    """Layer-weighted sum -> projector -> pooling -> dropout -> classifier.

    Args:
        num_states: hidden states of the upstream (``encoder_layers + 1``).
        embed_dim: upstream dim ``D``.
        num_speakers: classes ``S``.
        projector_dim: ``P`` (0: no projector, ``P = D``).
        pooling: ``mean`` or ``attentive`` (mean + std).
        dropout: before the classifier (``model.final_dropout``).

    ``forward(states, padding_mask) -> (logits (B, S), embedding (B, E))``.
    """

    def __init__(self, num_states: int, embed_dim: int, num_speakers: int, projector_dim: int = 256,
                 pooling: str = "mean", dropout: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got '{pooling}'")
        if num_speakers < 2:
            raise ValueError(f"speaker identification needs at least 2 speakers, got {num_speakers}")
        self.featurizer = WeightedLayerSum(num_states)
        self.projector = nn.Linear(embed_dim, projector_dim) if projector_dim > 0 else nn.Identity()
        dim = projector_dim if projector_dim > 0 else embed_dim
        self.pooling = MeanPooling(dim) if pooling == "mean" else AttentiveStatsPooling(dim)
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(self.pooling.out_dim, num_speakers)

    def embed(self, states: list[Tensor], padding_mask: Optional[Tensor] = None) -> Tensor:
        """Utterance embeddings ``(B, E)``: the pooled features the classifier sees."""
        return self.pooling(self.projector(self.featurizer(states)), padding_mask)

    def forward(self, states: list[Tensor], padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        embedding = self.embed(states, padding_mask)
        return self.classifier(self.dropout(embedding)), embedding


class SpeakerIdModel(nn.Module):
    """An upstream (attribute ``w2v_model``, as fairseq's fine-tuned models) plus a :class:`SpeakerHead`.

    Args:
        upstream: wav2vec 2.0 / HuBERT model (``forward(source, padding_mask, mask, features_only)``, an
            ``encoder`` with ``layers``), pretraining modules removed or not.
        speakers: class names, in class-index order (``dict.spk.txt``).
        freeze_upstream: frozen mode (see the module docstring).
        freeze_finetune_updates: full fine-tuning: updates during which the Transformer is not trained.
        apply_mask: full fine-tuning: the upstream's time/channel masking in training.
        projector_dim, pooling, final_dropout: the head's settings.

    ``forward(source (B, T), padding_mask (B, T) or None)`` returns ``{"logits": (B, S), "embedding":
    (B, E), "padding_mask": (B, L) or None}``.
    """

    def __init__(self, upstream: nn.Module, speakers: list[str], freeze_upstream: bool = True,
                 freeze_finetune_updates: int = 0, apply_mask: bool = False, projector_dim: int = 256,
                 pooling: str = "mean", final_dropout: float = 0.0):
        super().__init__()
        if len(set(speakers)) != len(speakers):
            raise ValueError("speaker names must be unique")
        self.w2v_model = upstream
        self.speakers = list(speakers)
        self.freeze_upstream = freeze_upstream
        self.freeze_finetune_updates = freeze_finetune_updates
        self.apply_mask = apply_mask
        self.num_updates = 0
        encoder = upstream.encoder
        dim = encoder.layer_norm.normalized_shape[0]
        self.head = SpeakerHead(len(encoder.layers) + 1, dim, len(speakers), projector_dim, pooling, final_dropout)
        frozen = upstream.parameters() if freeze_upstream else upstream.feature_extractor.parameters()
        for p in frozen:
            p.requires_grad_(False)
        if freeze_upstream:
            upstream.eval()

    # ---------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"speakers": list(self.speakers)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        speakers = list(state["speakers"])
        if len(speakers) != self.head.classifier.out_features:
            raise ValueError(f"the state has {len(speakers)} speakers, the model {self.head.classifier.out_features}")
        self.speakers = speakers

    def train(self, mode: bool = True) -> "SpeakerIdModel":
        super().train(mode)
        if self.freeze_upstream:
            self.w2v_model.eval()  # no dropout / masking in a frozen upstream, in training too
        return self

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates
        if hasattr(self.w2v_model, "set_num_updates"):
            self.w2v_model.set_num_updates(num_updates)

    @property
    def upstream_trains(self) -> bool:
        """Whether this update backpropagates into the upstream's Transformer."""
        return not self.freeze_upstream and self.num_updates >= self.freeze_finetune_updates

    # ---------------------------------------------------------------------------------------------
    def hidden_states(self, source: Tensor,
                      padding_mask: Optional[Tensor] = None) -> tuple[list[Tensor], Optional[Tensor]]:
        """The upstream's ``N x (B, L, D)`` hidden states and the frame padding mask (see
        :func:`upstream_hidden_states`), with autograd only while the upstream trains."""
        mask = self.apply_mask and self.training and not self.freeze_upstream
        grad = torch.is_grad_enabled() and self.training and self.upstream_trains
        with contextlib.nullcontext() if grad else torch.no_grad():
            return upstream_hidden_states(self.w2v_model, source, padding_mask, mask=mask)

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> dict[str, Any]:
        states, frame_pad = self.hidden_states(source, padding_mask)
        logits, embedding = self.head(states, frame_pad)
        return {"logits": logits, "embedding": embedding, "padding_mask": frame_pad}

    @torch.no_grad()
    def embed(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Utterance embeddings ``(B, E)`` (pooled features; for verification scoring)."""
        states, frame_pad = self.hidden_states(source, padding_mask)
        return self.head.embed(states, frame_pad)


def speaker_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed cross-entropy (fp32) and logs: ``accuracy`` (per-utterance mean), ``correct``, ``count``.

    ``logits (B, S)``, ``target (B,)`` class indices. The trainer weights ``accuracy`` by the sample size
    (utterances), so validation reports the exact accuracy over the whole split.
    """
    loss = F.cross_entropy(logits.float(), target, reduction="sum")
    correct = (logits.argmax(dim=-1) == target).sum()
    logs = {"accuracy": correct.float().detach() / max(target.numel(), 1), "correct": correct.detach(),
            "count": target.numel()}  # a host int: no tensor copied to the device
    return loss, logs
