"""wav2vec 2.0 (Baevski et al., 2020): the pretraining model and its published configurations.

Data flow of :meth:`Wav2Vec2Model.forward` (fairseq's ``Wav2Vec2Model.forward``)::

    source (B, T) --conv extractor--> conv_features (B, L, C) --(x feature_grad_mult)
        -> LayerNorm -> features (B, L, C) --dropout_features--> quantizer input at masked frames
        -> Linear(C, D) -> dropout_input -> span mask (learned mask_emb) [-> channel mask]
        -> Transformer (padded frames zeroed, key-padding masks) -> x (B, L, D)
    pretraining outputs at the M masked frames of each utterance:
        pred    = final_proj(x[mask])                      (B, M, final_dim)
        targets = project_q(quantizer(features[mask]))     (B, M, final_dim)

The contrastive loss itself (negatives, InfoNCE, diversity, feature penalty) is in
:mod:`speechssl.objectives.contrastive`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from speechssl.config import BASE_CONV_LAYERS, ModelConfig
from speechssl.models.components import Dropout, FeatureProjection, GradMultiply, TransformerEncoder
from speechssl.models.frontend import build_feature_extractor
from speechssl.models.masking import check_covered, compute_mask_indices, mask_positions, span_mask
from speechssl.models.quantizer import GumbelVectorQuantizer
from speechssl.utils.device import HostCopy

# fairseq options this implementation does not provide; each must keep its default.
_UNSUPPORTED = {
    "no_mask_overlap": False,
    "no_mask_channel_overlap": False,
    "negatives_from_everywhere": False,
    "cross_sample_negatives": 0,
    "codebook_negatives": 0,
}


FRAME_PADDING_RULES = ("auto", "all_samples", "conv_length")


def frame_padding_rule(cfg: ModelConfig) -> str:
    """``model.frame_padding`` with ``auto`` resolved to fairseq's rule for the model: ``all_samples``
    (``HubertModel.forward_padding_mask``) for HuBERT, ``conv_length`` (``Wav2Vec2Model.forward``) else;
    always ``conv_length`` (the exact frame count) for the log-mel front-end, which fairseq's HuBERT
    does not have."""
    if cfg.frame_padding != "auto":
        return cfg.frame_padding
    return "all_samples" if cfg.name == "hubert" and cfg.extractor_mode != "fbank" else "conv_length"


def _check_config(cfg: ModelConfig) -> None:
    if cfg.frame_padding not in FRAME_PADDING_RULES:
        raise ValueError(f"model.frame_padding must be one of {', '.join(FRAME_PADDING_RULES)}, "
                         f"got '{cfg.frame_padding}'")
    for key, default in _UNSUPPORTED.items():
        if getattr(cfg, key) != default:
            raise ValueError(f"model.{key}={getattr(cfg, key)!r} is not supported by speechssl's wav2vec 2.0; "
                             f"remove it from the recipe (default {default!r})")
    if not 0.0 <= cfg.mask_prob < 1.0:
        raise ValueError(f"model.mask_prob must be in [0, 1), got {cfg.mask_prob}")
    if cfg.feature_grad_mult < 0:
        raise ValueError(f"model.feature_grad_mult must be >= 0 (0 freezes the extractor), got {cfg.feature_grad_mult}")


class Wav2Vec2Model(nn.Module):
    """wav2vec 2.0 built from a :class:`~speechssl.config.ModelConfig` (fairseq field names).

    Parameter names follow fairseq where it has one (``mask_emb``, ``quantizer.vars``, ``project_q``,
    ``final_proj``, ``encoder.layers.N.self_attn`` / ``fc1`` / ``fc2`` ...); see
    :mod:`speechssl.models.weights` for the mapping to fairseq, torchaudio and transformers.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_config(cfg)
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
        final_dim = cfg.final_dim if cfg.final_dim > 0 else D
        self.quantizer: Optional[GumbelVectorQuantizer] = None
        if cfg.quantize_targets:
            vq_dim = cfg.latent_dim if cfg.latent_dim > 0 else final_dim
            self.quantizer = GumbelVectorQuantizer(C, cfg.latent_vars, cfg.latent_groups, vq_dim, cfg.latent_temp)
            self.project_q = nn.Linear(vq_dim, final_dim)
        else:
            self.project_q = nn.Linear(C, final_dim)
        self.final_proj = nn.Linear(D, final_dim)

    # ---------------------------------------------------------------------------------------------

    def set_num_updates(self, num_updates: int) -> None:
        """Anneal the quantizer temperature to ``max(start * decay**num_updates, end)``."""
        if self.quantizer is not None:
            self.quantizer.set_num_updates(num_updates)

    def frame_padding_mask(self, padding_mask: Optional[Tensor], num_frames: int) -> Optional[Tensor]:
        """Sample-level ``(B, T)`` padding mask (True = padded) -> frame-level ``(B, L)``; None for None (the
        collater gives None when no item is padded; testing a device mask for "nothing padded" would make
        the host wait for the device). Two rules (``model.frame_padding``, see :func:`frame_padding_rule`):

        * ``conv_length`` (wav2vec 2.0; torchaudio, transformers): a frame is valid iff it lies within the
          conv output length of the valid samples;
        * ``all_samples`` (fairseq's HuBERT): the mask, cut to a multiple of ``L`` samples, is viewed as
          ``(B, L, T // L)``; a frame is padded iff all of its samples are. For right padding this gives
          ``min(L, ceil(n / (T // L)))`` valid frames for ``n`` valid samples, usually one more than the
          conv rule (BASE: 16,000 of 32,000 samples -> 50 valid frames, conv rule 49).
        """
        if padding_mask is None:
            return None
        if frame_padding_rule(self.cfg) == "all_samples":
            B, T = padding_mask.shape
            window = T // num_frames
            return padding_mask[:, : window * num_frames].reshape(B, num_frames, window).all(dim=-1)
        lengths = self.feature_extractor.output_lengths((~padding_mask).sum(dim=1))
        return torch.arange(num_frames, device=padding_mask.device)[None, :] >= lengths[:, None]

    def extract_conv_features(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """``(B, T) -> (B, L, C)``, scaling the gradient by ``feature_grad_mult`` (0, or a front-end without
        parameters such as log-mel filterbanks: no graph at all). ``padding_mask (B, T)`` reaches the
        log-mel front-end (its per-utterance standardization skips padding); the conv stack ignores it."""
        if self.cfg.extractor_mode == "fbank":
            lengths = None if padding_mask is None else (~padding_mask).sum(dim=1)
            with torch.no_grad():
                return self.feature_extractor(source, lengths)
        mult = self.cfg.feature_grad_mult
        if mult > 0:
            features = self.feature_extractor(source)
            return GradMultiply.apply(features, mult) if mult != 1.0 else features
        with torch.no_grad():
            return self.feature_extractor(source)

    def feature_penalty(self, conv: Tensor) -> Tensor:
        """fp32 mean of the squared front-end output (fairseq's ``features_pen``); 0 for the log-mel
        front-end, which has nothing to penalize (no parameters)."""
        if self.cfg.extractor_mode == "fbank":
            return conv.new_zeros((), dtype=torch.float32)
        return conv.float().pow(2).mean()

    def random_mask(self, shape: torch.Size, padding_mask: Optional[Tensor],
                    device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Random span mask ``(B, L)`` of the model's settings and its ``covered`` rows (see
        :func:`~speechssl.models.masking.span_mask`; checked by :meth:`check_mask`), or ``(None, None)``
        when ``model.mask_prob`` is 0. Nothing is read on the host."""
        cfg = self.cfg
        if cfg.mask_prob <= 0:
            return None, None
        return span_mask(tuple(shape), padding_mask, cfg.mask_prob, cfg.mask_length, cfg.mask_selection,
                         cfg.mask_other, min_masks=2, require_same_masks=cfg.require_same_masks,
                         mask_dropout=cfg.mask_dropout, device=device)

    def apply_mask(self, x: Tensor, padding_mask: Optional[Tensor],
                   mask_indices: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Replace masked frames of ``x (B, L, D)`` by ``mask_emb``; zero masked channels (fine-tuning).

        ``mask_indices`` ``(B, L)`` bool overrides the random span mask (which, made here, is checked on the
        host at once; ``forward`` makes it with :meth:`random_mask` and checks it later). Returns
        ``(x, mask_indices)``.
        """
        cfg = self.cfg
        B, L, D = x.shape
        if mask_indices is None and cfg.mask_prob > 0:
            mask_indices = compute_mask_indices(
                (B, L), padding_mask, cfg.mask_prob, cfg.mask_length, cfg.mask_selection, cfg.mask_other,
                min_masks=2, require_same_masks=cfg.require_same_masks, mask_dropout=cfg.mask_dropout,
                device=x.device,
            )
        if mask_indices is not None:
            x = torch.where(mask_indices.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        if cfg.mask_channel_prob > 0:
            channels, _ = span_mask(  # a channel mask that covers every channel only zeroes the input
                (B, D), None, cfg.mask_channel_prob, cfg.mask_channel_length, cfg.mask_channel_selection,
                cfg.mask_channel_other, device=x.device,
            )
            x = x.masked_fill(channels.unsqueeze(1), 0.0)
        return x, mask_indices

    def frame_counts(self, mask_indices: Tensor, covered: Optional[Tensor], *extra: Tensor) -> HostCopy:
        """Masked frames of every utterance, ``covered`` (:meth:`random_mask`; -1s for None), then the 0-d
        counts ``extra``: one host copy started now and read later (``2 * B + len(extra)`` values; reading
        them after the encoder is queued costs no device time, see :class:`HostCopy`)."""
        counts = mask_indices.sum(dim=1)
        covered = torch.full_like(counts, -1) if covered is None else covered
        return HostCopy(torch.cat([counts, covered, *(e.reshape(1) for e in extra)]))

    def check_mask(self, counts: list[int], batch_size: int) -> None:
        """ValueError when the random mask covered every valid frame of an utterance (``counts``: the values
        of :meth:`frame_counts`)."""
        check_covered(counts[batch_size : 2 * batch_size], self.cfg.mask_length, min_masks=2)

    # ---------------------------------------------------------------------------------------------

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, mask: bool = True,
                features_only: bool = False, output_layer: Optional[int] = None,
                mask_indices: Optional[Tensor] = None) -> dict[str, Any]:
        """Run the model.

        Args:
            source: ``(B, T)`` float waveform.
            padding_mask: ``(B, T)`` bool, True at padded samples, or None.
            mask: apply span masking (and channel masking when ``mask_channel_prob > 0``).
            features_only: stop after the encoder (no quantizer / projections).
            output_layer: 1-based encoder layer to stop at (see :class:`TransformerEncoder`).
            mask_indices: ``(B, L)`` bool frame mask to use instead of a random one.

        Returns a dict: ``x`` ``(B, L, D)`` encoder output; ``padding_mask`` ``(B, L)`` frame-level or None;
        ``layer_results`` list of ``(B, L, D)``; ``conv_features`` ``(B, L, C)`` extractor output;
        ``features`` ``(B, L, C)`` normalised features after ``dropout_features`` (the quantizer's input);
        ``features_pen`` fp32 scalar mean of squared conv features (0 for log-mel); ``mask_indices`` ``(B, L)`` or None.
        Unless ``features_only``, also: ``pred`` and ``targets`` ``(B, M, final_dim)`` at the ``M`` masked
        frames of each utterance (row-major order), ``codes`` ``(B, M, G)`` quantizer indices (None without
        quantizer), ``code_perplexity``, ``prob_perplexity``, ``num_vars``, ``temp``.

        On a GPU the host reads one thing, once the encoder is queued: the masked-frame counts
        (:meth:`frame_counts`), which size the outputs and check the mask.
        """
        if source.dim() != 2:
            raise ValueError(f"source must be (batch, samples), got shape {tuple(source.shape)}")
        if padding_mask is not None and padding_mask.shape != source.shape:
            raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} != source shape {tuple(source.shape)}")
        conv = self.extract_conv_features(source, padding_mask)
        features_pen = self.feature_penalty(conv)
        frame_pad = self.frame_padding_mask(padding_mask, conv.shape[1])
        x, features = self.feature_projection(conv)
        features = self.dropout_features(features)
        covered = None
        if mask:
            if mask_indices is None:
                mask_indices, covered = self.random_mask(x.shape[:2], frame_pad, x.device)
            x, mask_indices = self.apply_mask(x, frame_pad, mask_indices)
        else:
            mask_indices = None
        counts = None
        if mask_indices is not None and (covered is not None or not features_only):
            counts = self.frame_counts(mask_indices, covered)  # read once the encoder is queued
        x, layer_results = self.encoder(x, frame_pad, output_layer)
        if covered is not None:
            self.check_mask(counts.get(), x.shape[0])
        out: dict[str, Any] = {
            "x": x, "padding_mask": frame_pad, "layer_results": layer_results, "conv_features": conv,
            "features": features, "features_pen": features_pen, "mask_indices": mask_indices,
        }
        if features_only:
            return out
        if mask_indices is None:
            raise ValueError("pretraining outputs need masked frames: call with mask=True and model.mask_prob > 0")
        return self._pretraining_outputs(out, counts.get()[: x.shape[0]])

    def _pretraining_outputs(self, out: dict[str, Any], masked: list[int]) -> dict[str, Any]:
        """Heads at the masked frames; ``masked``: masked frames per utterance (host values)."""
        x, features, mask_indices = out["x"], out["features"], out["mask_indices"]
        fewest, most = min(masked), max(masked)
        if fewest != most:
            raise ValueError(f"utterances have different numbers of masked frames ({fewest}..{most}); "
                             "wav2vec 2.0 pretraining needs model.require_same_masks=true")
        index = mask_positions(mask_indices, fewest).unsqueeze(-1)  # (B, M, 1): x[mask] without a host sync
        y = features.gather(1, index.expand(-1, -1, features.shape[-1]))
        out["pred"] = self.final_proj(x.gather(1, index.expand(-1, -1, x.shape[-1])))
        out.update(codes=None, code_perplexity=None, prob_perplexity=None, num_vars=None, temp=None)
        if self.quantizer is not None:
            q = self.quantizer(y)
            y = q.pop("x")
            out.update(q)
        out["targets"] = self.project_q(y)
        return out


# --------------------------------------------------------------------------------------------------
# Published configurations
# --------------------------------------------------------------------------------------------------


def wav2vec2_base_config() -> ModelConfig:
    """wav2vec 2.0 BASE (fairseq ``wav2vec2_base_librispeech``): ~95M parameters."""
    return ModelConfig(
        name="wav2vec2",
        extractor_mode="default", conv_feature_layers=list(BASE_CONV_LAYERS), conv_bias=False,
        feature_grad_mult=0.1,
        encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
        activation_fn="gelu", layer_norm_first=False,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, encoder_layerdrop=0.05,
        dropout_input=0.1, dropout_features=0.1, conv_pos=128, conv_pos_groups=16,
        final_dim=256, quantize_targets=True, latent_vars=320, latent_groups=2, latent_dim=0,
        latent_temp=(2.0, 0.5, 0.999995),
        mask_length=10, mask_prob=0.65, mask_selection="static", mask_other=0.0, no_mask_overlap=False,
        mask_min_space=1, require_same_masks=True, mask_dropout=0.0,
        mask_channel_length=10, mask_channel_prob=0.0, mask_channel_selection="static", mask_channel_other=0.0,
        no_mask_channel_overlap=False, mask_channel_min_space=1,
        num_negatives=100, negatives_from_everywhere=False, cross_sample_negatives=0, codebook_negatives=0,
        logit_temp=0.1,
    )


def wav2vec2_large_config() -> ModelConfig:
    """wav2vec 2.0 LARGE (fairseq ``wav2vec2_large_librivox``): pre-LN, layer-norm extractor with conv
    bias, 24 x 1024, final_dim 768, temperature floor 0.1, no dropout; ~317M parameters. (That recipe
    also sets ``criterion.loss_weights: [0.1, 0]``, i.e. no feature penalty.)"""
    return replace(
        wav2vec2_base_config(),
        extractor_mode="layer_norm", conv_bias=True, feature_grad_mult=1.0,
        encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16,
        layer_norm_first=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
        dropout_input=0.0, dropout_features=0.0,
        final_dim=768, latent_temp=(2.0, 0.1, 0.999995),
    )


def wav2vec2_tiny_config() -> ModelConfig:
    """A ~70k-parameter model with BASE's structure (post-LN, group-norm extractor, same 320x
    downsampling) for tests and smoke runs: 32 conv channels, 2 layers x 48 dims, 2 x 16 codes."""
    return replace(
        wav2vec2_base_config(),
        conv_feature_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        encoder_layers=2, encoder_embed_dim=48, encoder_ffn_embed_dim=96, encoder_attention_heads=4,
        encoder_layerdrop=0.0, conv_pos=16, conv_pos_groups=4,
        final_dim=32, latent_vars=16, latent_groups=2, latent_dim=0,
        mask_length=4, num_negatives=20,
    )


def wav2vec2_base() -> Wav2Vec2Model:
    return Wav2Vec2Model(wav2vec2_base_config())


def wav2vec2_large() -> Wav2Vec2Model:
    return Wav2Vec2Model(wav2vec2_large_config())


def wav2vec2_tiny() -> Wav2Vec2Model:
    return Wav2Vec2Model(wav2vec2_tiny_config())
