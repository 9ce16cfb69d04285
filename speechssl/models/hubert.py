"""HuBERT (Hsu et al., 2021): masked prediction of cluster labels, and its published configurations.

Same front-end, encoder and masking as wav2vec 2.0 (the component classes of
:mod:`speechssl.models.components` and the masking / padding methods of
:class:`~speechssl.models.wav2vec2.Wav2Vec2Model`); instead of a quantizer and contrastive targets, the
encoder output predicts frame labels (k-means cluster ids). Data flow of :meth:`HubertModel.forward`
(fairseq's ``HubertModel.forward``)::

    source (B, T) --conv extractor--> (B, L, C) --(x feature_grad_mult)
        -> [trim L so that every frame has a label: forward_targets]  -> features_pen = mean(conv**2)
        -> LayerNorm -> Linear(C, D) -> dropout_input -> span mask (learned mask_emb)
        -> Transformer (padded frames zeroed, key-padding masks) -> x (B, L, D)
    for label set i (K_i classes), at the masked (and, unless skip_nomask, the unmasked) valid frames:
        logits_i = cos(final_proj(x)_i, label_embs_i) / logit_temp          (frames, K_i), fp32

``final_proj`` is ``Linear(D, final_dim * num_sets)`` chunked per label set when ``untie_final_proj``
(HuBERT BASE/LARGE), else one ``Linear(D, final_dim)`` shared by all sets. ``label_embs_concat``
``(sum K_i, final_dim)`` holds every set's label embeddings (fairseq's name and layout).

Logits: fairseq (and torchaudio) return ``(frames, 1 + K)`` with the positive first and the target's own
column set to -inf, i.e. the same cross-entropy as plain class logits ``(frames, K)`` with the label as
target. This module returns the class logits (``logit_m_list[i][n, k] = cos(p_n, e_k) / logit_temp``),
which are what the loss and accuracy need; the conversion is one gather (see the parity tests).

Padding (fairseq's ``forward_padding_mask``, ``model.frame_padding: auto``): a frame is padded only when all
of its samples are, on the frames left after the alignment below; see
:meth:`~speechssl.models.wav2vec2.Wav2Vec2Model.frame_padding_mask` for the rule torchaudio / transformers use.

Frame alignment (fairseq's ``forward_targets``): with ``r = label_rate * downsampling / sample_rate``
labels per frame (2 for 100 Hz MFCC labels, 1 for 50 Hz layer labels, for 20 ms frames), frames are cut
to ``min(L, int(label_len / r))`` when the labels are too short, and frame ``t`` takes label
``int(t * r)``. Label positions < 0 (padding of a shorter utterance's labels) are never predicted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.config import BASE_CONV_LAYERS, ModelConfig
from speechssl.models.components import Dropout, FeatureProjection, TransformerEncoder
from speechssl.models.frontend import build_feature_extractor
from speechssl.models.masking import mask_positions
from speechssl.models.wav2vec2 import Wav2Vec2Model, _check_config
from speechssl.utils.device import fp32_matmul


class HubertModel(nn.Module):
    """HuBERT built from a :class:`~speechssl.config.ModelConfig` (``name: hubert``, fairseq field names).

    Submodules as :class:`~speechssl.models.wav2vec2.Wav2Vec2Model` (``feature_extractor``,
    ``feature_projection``, ``mask_emb``, ``encoder``) plus ``final_proj`` and ``label_embs_concat``
    (see the module docstring; :mod:`speechssl.models.weights` maps them to torchaudio / transformers /
    fairseq). ``cfg.num_classes`` (classes per label set) must be set for pretraining outputs; a
    features-only model (fine-tuning, feature extraction) may leave it empty.

    Args:
        cfg: the model section; ``cfg.label_rate`` (labels/s) is needed only when targets are given.
        sample_rate: audio sample rate, for the label-to-frame ratio (16 kHz for every published model).
    """

    # the very same code as wav2vec 2.0 (it only uses cfg, feature_extractor and mask_emb); the frame
    # padding rule follows model.frame_padding, fairseq's all_samples for HuBERT unless set
    frame_padding_mask = Wav2Vec2Model.frame_padding_mask
    feature_penalty = Wav2Vec2Model.feature_penalty
    extract_conv_features = Wav2Vec2Model.extract_conv_features
    apply_mask = Wav2Vec2Model.apply_mask
    random_mask = Wav2Vec2Model.random_mask
    frame_counts = Wav2Vec2Model.frame_counts
    check_mask = Wav2Vec2Model.check_mask

    def __init__(self, cfg: ModelConfig, sample_rate: int = 16000):
        super().__init__()
        _check_config(cfg)
        if any(k < 1 for k in cfg.num_classes):
            raise ValueError(f"model.num_classes must be positive class counts, got {cfg.num_classes}")
        self.cfg = cfg
        D = cfg.encoder_embed_dim
        self.feature_extractor = build_feature_extractor(cfg)
        C = self.feature_extractor.out_channels
        self.feature_projection = FeatureProjection(C, D, cfg.dropout_input)
        self.dropout_features = Dropout(cfg.dropout_features)
        self.mask_emb = nn.Parameter(torch.empty(D).uniform_())
        self.encoder = TransformerEncoder(
            D, cfg.encoder_ffn_embed_dim, cfg.encoder_layers, cfg.encoder_attention_heads, cfg.dropout,
            cfg.attention_dropout, cfg.activation_dropout, cfg.layer_norm_first, cfg.encoder_layerdrop,
            cfg.conv_pos, cfg.conv_pos_groups, cfg.activation_fn,
        )
        self.final_dim = cfg.final_dim if cfg.final_dim > 0 else D
        self.num_classes = list(cfg.num_classes)
        n_sets = max(len(self.num_classes), 1)
        self.final_proj: Optional[nn.Linear] = nn.Linear(
            D, self.final_dim * n_sets if cfg.untie_final_proj else self.final_dim)
        self.label_embs_concat: Optional[nn.Parameter] = None
        if self.num_classes:
            self.label_embs_concat = nn.Parameter(torch.empty(sum(self.num_classes), self.final_dim).uniform_())
        downsample = self.feature_extractor.stride
        self.sample_rate = sample_rate
        # labels per frame (fairseq's feat2tar_ratio); None: no label rate, no targets accepted
        self.feat2tar_ratio = cfg.label_rate * downsample / sample_rate if cfg.label_rate > 0 else None

    # ---------------------------------------------------------------------------------------------

    def set_num_updates(self, num_updates: int) -> None:
        """No schedule inside HuBERT (kept for the trainer's interface)."""

    def forward_targets(self, features: Tensor, target_list: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Align frames ``(B, L, C)`` and label sequences ``[(B, N_i), ...]`` (fairseq's ``forward_targets``).

        Returns the features cut to the frames that have labels and ``[(B, L'), ...]`` frame labels.
        """
        if self.feat2tar_ratio is None:
            raise ValueError("targets need model.label_rate (labels per second, e.g. 100 for MFCC k-means "
                             "labels, 50 for layer-feature labels); set task.label_rate")
        r = self.feat2tar_ratio
        L = features.shape[1]
        label_len = min(t.shape[1] for t in target_list)
        if r * L > label_len:
            L = int(label_len / r)
            features = features[:, :L]
        idx = (torch.arange(L, device=features.device).float() * r).long()  # fairseq: float32
        return features, [t[:, idx] for t in target_list]

    def label_logits(self, proj: Tensor, set_index: int) -> Tensor:
        """Class logits ``(N, K_i)`` in IEEE fp32 (never TF32): cosine of ``proj (N, final_dim)`` with label
        set ``i``'s embeddings, divided by ``logit_temp``."""
        start = sum(self.num_classes[:set_index])
        emb = self.label_embs_concat[start : start + self.num_classes[set_index]]
        with torch.autocast(device_type=proj.device.type, enabled=False):
            p = F.normalize(proj.float(), dim=-1, eps=1e-8)
            e = F.normalize(emb.float(), dim=-1, eps=1e-8)
            return fp32_matmul(p, e.t()) / self.cfg.logit_temp

    # ---------------------------------------------------------------------------------------------

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, mask: bool = True,
                features_only: bool = False, output_layer: Optional[int] = None,
                mask_indices: Optional[Tensor] = None,
                target_list: Optional[Sequence[Tensor]] = None,
                skip_nomask: Optional[bool] = None) -> dict[str, Any]:
        """Run the model.

        Args:
            source: ``(B, T)`` float waveform.
            padding_mask: ``(B, T)`` bool, True at padded samples, or None.
            mask: apply span masking (and channel masking when ``mask_channel_prob > 0``).
            features_only: stop after the encoder (no projections, no targets needed).
            output_layer: 1-based encoder layer to stop at.
            mask_indices: ``(B, L)`` bool frame mask to use instead of a random one (``L`` after alignment
                to the targets).
            target_list: one ``(B, N_i)`` int64 label tensor per label set at ``model.label_rate``
                (values in ``[0, K_i)``, negative = no label); required unless ``features_only``.
            skip_nomask: no logits at unmasked frames (default ``model.skip_nomask``); the HuBERT objective
                asks for it when ``criterion.pred_nomask_weight`` is 0, so they are not computed for nothing.

        Returns a dict with the keys of :meth:`Wav2Vec2Model.forward` with ``features_only``: ``x``
        ``(B, L, D)``, ``padding_mask`` ``(B, L)`` or None, ``layer_results``, ``conv_features``
        ``(B, L, C)``, ``features`` (normalised features after ``dropout_features``; features-only),
        ``features_pen`` (fp32 scalar), ``mask_indices`` ``(B, L)`` or None. Unless ``features_only``,
        also per label set ``i``: ``logit_m_list[i]`` ``(M, K_i)`` fp32 class logits at the masked valid
        frames (row-major order) and ``target_m_list[i]`` ``(M,)`` their labels, ``logit_u_list`` /
        ``target_u_list`` at the unmasked valid frames (lists of None when ``skip_masked`` /
        ``skip_nomask``).
        """
        if source.dim() != 2:
            raise ValueError(f"source must be (batch, samples), got shape {tuple(source.shape)}")
        if padding_mask is not None and padding_mask.shape != source.shape:
            raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} != source shape {tuple(source.shape)}")
        if not features_only:
            if not target_list:
                raise ValueError("HuBERT pretraining outputs need target_list (one label tensor per label set); "
                                 "call with features_only=True for features")
            if len(target_list) != len(self.num_classes):
                raise ValueError(f"{len(target_list)} label sets given, but the model was built for "
                                 f"{len(self.num_classes)} (model.num_classes={self.num_classes})")
        conv = self.extract_conv_features(source, padding_mask)
        if target_list is not None and not features_only:
            conv, target_list = self.forward_targets(conv, target_list)
        features_pen = self.feature_penalty(conv)
        frame_pad = self.frame_padding_mask(padding_mask, conv.shape[1])
        x, features = self.feature_projection(conv)
        covered = None
        if mask:
            if mask_indices is None:
                mask_indices, covered = self.random_mask(x.shape[:2], frame_pad, x.device)
            x, mask_indices = self.apply_mask(x, frame_pad, mask_indices)
        else:
            mask_indices = None
        scored = {}
        if not features_only:
            skip_nomask = self.cfg.skip_nomask if skip_nomask is None else skip_nomask
            scored = self.scored_frames(frame_pad, mask_indices, target_list, x.shape[:2], skip_nomask)
        counts = None
        if covered is not None or scored:  # read once the encoder is queued
            frames = mask_indices if mask_indices is not None else torch.zeros(x.shape[:2], dtype=torch.bool,
                                                                               device=x.device)
            counts = self.frame_counts(frames, covered, *(sel.sum() for sel in scored.values()))
        x, layer_results = self.encoder(x, frame_pad, output_layer)
        if covered is not None:
            self.check_mask(counts.get(), x.shape[0])
        out: dict[str, Any] = {
            "x": x, "padding_mask": frame_pad, "layer_results": layer_results, "conv_features": conv,
            "features_pen": features_pen, "mask_indices": mask_indices,
        }
        if features_only:
            out["features"] = self.dropout_features(features)
            return out
        totals = dict(zip(scored, counts.get()[2 * x.shape[0]:]))
        return self._pretraining_outputs(out, target_list, scored, totals)

    def scored_frames(self, frame_pad: Optional[Tensor], mask_indices: Optional[Tensor],
                      target_list: Sequence[Tensor], shape: torch.Size, skip_nomask: bool) -> dict[str, Tensor]:
        """The frames that get logits, ``(B, L)`` bool per kind: ``m`` masked, ``u`` unmasked (unless skipped);
        only valid frames with a label (>= 0) in every label set."""
        valid = torch.ones(shape, dtype=torch.bool, device=target_list[0].device)
        if frame_pad is not None:
            valid &= ~frame_pad
        for t in target_list:
            valid &= t >= 0
        masked = mask_indices if mask_indices is not None else torch.zeros_like(valid)
        scored = {}
        if not self.cfg.skip_masked:
            scored["m"] = valid & masked
        if not skip_nomask:
            scored["u"] = valid & ~masked
        return scored

    def _pretraining_outputs(self, out: dict[str, Any], target_list: Sequence[Tensor], scored: dict[str, Tensor],
                             totals: dict[str, int]) -> dict[str, Any]:
        """Logits and labels at the ``scored`` frames (``totals``: how many of each kind, host values),
        gathered in row-major order as ``x[sel]`` would, without its host sync."""
        cfg, x = self.cfg, out["x"]
        n_sets = len(target_list)
        for kind in ("m", "u"):
            logits, targets = [None] * n_sets, [None] * n_sets
            if kind in scored:
                index = mask_positions(scored[kind].reshape(-1), totals[kind])  # (N,) flat frame indices
                proj = self.final_proj(x.reshape(-1, x.shape[-1]).index_select(0, index))
                chunks = proj.chunk(n_sets, dim=-1) if cfg.untie_final_proj else [proj] * n_sets
                for i, t in enumerate(target_list):
                    logits[i] = self.label_logits(chunks[i], i)
                    targets[i] = t.reshape(-1).index_select(0, index)
            out[f"logit_{kind}_list"], out[f"target_{kind}_list"] = logits, targets
        return out


# --------------------------------------------------------------------------------------------------
# Published configurations
# --------------------------------------------------------------------------------------------------


def hubert_base_config(num_classes: Sequence[int] = (), label_rate: float = -1.0) -> ModelConfig:
    """HuBERT BASE (fairseq ``hubert_base_librispeech``): wav2vec 2.0 BASE's extractor and encoder, mask_prob
    0.80, untied final projection to 256; ~95M parameters. Iteration 1: ``num_classes=[100]``,
    ``label_rate=100``; iteration 2: ``[500]``, ``50``."""
    return ModelConfig(
        name="hubert",
        extractor_mode="default", conv_feature_layers=list(BASE_CONV_LAYERS), conv_bias=False,
        feature_grad_mult=0.1,
        encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
        activation_fn="gelu", layer_norm_first=False,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, encoder_layerdrop=0.05,
        dropout_input=0.1, dropout_features=0.1, conv_pos=128, conv_pos_groups=16,
        final_dim=256, quantize_targets=False, latent_vars=320, latent_groups=2, latent_dim=0,
        latent_temp=(2.0, 0.5, 0.999995),
        mask_length=10, mask_prob=0.80, mask_selection="static", mask_other=0.0, no_mask_overlap=False,
        mask_min_space=1, require_same_masks=True, mask_dropout=0.0,
        mask_channel_length=10, mask_channel_prob=0.0, mask_channel_selection="static", mask_channel_other=0.0,
        no_mask_channel_overlap=False, mask_channel_min_space=1,
        num_negatives=100, negatives_from_everywhere=False, cross_sample_negatives=0, codebook_negatives=0,
        logit_temp=0.1,
        skip_masked=False, skip_nomask=False, untie_final_proj=True,
        num_classes=list(num_classes), label_rate=label_rate,
    )


def hubert_large_config(num_classes: Sequence[int] = (), label_rate: float = -1.0) -> ModelConfig:
    """HuBERT LARGE (fairseq ``hubert_large_ll60k``, torchaudio ``hubert_pretrain_large``): pre-LN,
    layer-norm extractor WITHOUT conv bias (unlike wav2vec 2.0 LARGE), 24 x 1024, final_dim 768,
    feature_grad_mult 1.0, no dropout and no LayerDrop; ~317M parameters."""
    return replace(
        hubert_base_config(num_classes, label_rate),
        extractor_mode="layer_norm", conv_bias=False, feature_grad_mult=1.0,
        encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16,
        layer_norm_first=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        encoder_layerdrop=0.0, dropout_input=0.0, dropout_features=0.0, final_dim=768,
    )


def hubert_tiny_config(num_classes: Sequence[int] = (8,), label_rate: float = 50.0) -> ModelConfig:
    """A small model with BASE's structure (post-LN, group-norm extractor, 320x downsampling) for tests:
    32 conv channels, 2 layers x 48 dims, final_dim 16, 8 classes at 50 labels/s."""
    return replace(
        hubert_base_config(num_classes, label_rate),
        conv_feature_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        encoder_layers=2, encoder_embed_dim=48, encoder_ffn_embed_dim=96, encoder_attention_heads=4,
        encoder_layerdrop=0.0, conv_pos=16, conv_pos_groups=4, final_dim=16, mask_length=4,
    )


def hubert_base(num_classes: Sequence[int] = (100,), label_rate: float = 100.0) -> HubertModel:
    return HubertModel(hubert_base_config(num_classes, label_rate))


def hubert_large(num_classes: Sequence[int] = (500,), label_rate: float = 50.0) -> HubertModel:
    return HubertModel(hubert_large_config(num_classes, label_rate))


def hubert_tiny(num_classes: Sequence[int] = (8,), label_rate: float = 50.0) -> HubertModel:
    return HubertModel(hubert_tiny_config(num_classes, label_rate))
