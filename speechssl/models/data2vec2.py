"""data2vec 2.0 (Baevski et al., 2022, arXiv 2212.07525): self-distillation with a moving-average teacher.

The student encodes only the unmasked frames of ``clone_batch`` masked copies of each utterance; a light
convolutional decoder fills in the masked positions; the teacher, an exponential moving average (EMA) of
the student's encoder, encodes the whole unmasked utterance once, and its targets are the mean of its top
``average_top_k_layers`` feed-forward outputs, each instance-normalised over time. The loss (in
:mod:`speechssl.objectives.data2vec2`) is the squared error at the masked frames. Data flow of
:meth:`Data2Vec2Model.forward` in pretraining (fairseq's ``Data2VecMultiModel.forward`` for audio,
``examples/data2vec/models/data2vec2.py`` and ``modalities/base.py``, ``audio.py``)::

    source (B, T) --front-end--> (B, L, C) --(x feature_grad_mult)--> LayerNorm -> Linear(C, D): features (B, L, D)
    teacher (no gradient, eval mode), once per utterance:
        f + pos(f) -> LayerNorm -> layers with ALiBi -> FFN outputs of the top K layers
        -> each instance-normalised over time -> mean: targets (B, L, D), fp32
    student, on B' = B * clone_batch rows (each utterance repeated), each with its own block mask of
    M = int(L * mask_prob) frames (K' = L - M kept):
        f with masked frames zeroed -> f + pos(f), the K' kept frames only -> LayerNorm -> dropout
        -> layers with ALiBi at the kept frames' positions -> (B', K', D)
        -> decoder input: those (dropout) at their positions, N(0, mask_noise_std) at the masked ones (B', L, D)
        -> conv decoder -> pred at the M masked frames (B', M, D); targets of the same frames (B', M, D)

``pos`` is a stack of ``conv_pos_depth`` grouped convolutions (each followed by a LayerNorm without
affine and GELU); the attention logits of head ``h`` get ``-slope_h * scale_h * |i - j|`` for frames at
positions ``i``, ``j`` of the utterance (ALiBi; ``scale_h`` learned, clamped at 0), also when the student
sees only some frames. The teacher is updated by :meth:`Data2Vec2Model.update_teacher`, which the trainer
calls after every optimizer step: ``teacher = d * teacher + (1 - d) * student`` for the positional
convolutions, the LayerNorm, the ALiBi scales and every layer (fairseq's ``ema_encoder_only: false``; the
front-end, the projection and the decoder have no teacher copy), ``d`` annealed linearly from
``ema_decay`` to ``ema_end_decay`` over ``ema_anneal_end_step`` updates. It lives in the state dict
(``teacher.*``), so checkpoints hold it and a run resumes with it exactly.

As an upstream (fine-tuning, probes, ``extract``: ``features_only=True``) the model is the student: front-end,
projection, ``encoder``; ``teacher`` and ``decoder`` are pretraining modules
(:func:`speechssl.models.pretrained.remove_pretraining_modules` drops them). Masking while fine-tuning
replaces the masked frames by N(0, ``mask_noise_std``) noise (fairseq's data2vec 2.0 fine-tuning,
``encoder_zero_mask: false``) and zeroes masked channels.

Where speechssl differs from fairseq (documented in README "data2vec 2.0"):

* block masks are drawn on the device at the batch's length, exactly ``int(L * mask_prob)`` frames per row
  (:func:`~speechssl.models.masking.block_mask`); fairseq draws them per utterance at its full length in
  the data loader and crops them with the audio, so its rows are masked ``mask_prob`` only on average;
* ``layer_results`` are the layers' outputs (transformers' hidden states), fairseq's ``extract_features``
  returns their feed-forward outputs;
* fairseq's layers (timm's ``Mlp``) also apply ``activation_dropout`` after ``fc2``; speechssl's do not
  (the published settings have ``activation_dropout: 0``).

With ``use_alibi_encoder: false`` and ``pos_conv_zero_padding: true`` the encoder is the data2vec (1.0) audio
encoder of transformers' ``Data2VecAudioModel`` (same layer-norm front-end, projection, positional stack,
post-LN layers), which zeroes the padded frames before its positional convolutions; fairseq's data2vec 2.0
does not (``false``, the default). Either way the stacked convolutions let a padded utterance's features
depend on its padding (from the second convolution on, the padded frames are no longer zero), as a group-norm
front-end's do: ``evaluate`` scores such upstreams one utterance at a time
(:func:`~speechssl.models.pretrained.padding_changes_outputs`).
Pretraining batches are cropped, never padded.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.config import BASE_CONV_LAYERS, ModelConfig
from speechssl.models.components import Dropout, FeatureProjection, TransformerLayer, dropout, init_bert_params
from speechssl.models.frontend import build_feature_extractor
from speechssl.models.masking import block_mask, check_covered, mask_positions, span_mask
from speechssl.models.wav2vec2 import FRAME_PADDING_RULES, Wav2Vec2Model
from speechssl.utils.device import HostCopy


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (fairseq's ``get_alibi``): ``2^(-8 i / n)`` for ``n`` a power of two, else those
    of the largest power of two below ``heads`` followed by every second slope of twice that."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


class PositionalConvLayer(nn.Module):
    """Grouped ``Conv1d(D, D, kernel, padding=kernel // 2)`` (one trailing frame dropped for an even kernel) ->
    LayerNorm over channels without affine -> GELU. ``(B, D, L) -> (B, D, L)``."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        if dim % groups:
            raise ValueError(f"model.encoder_embed_dim ({dim}) must be divisible by model.conv_pos_groups ({groups})")
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.remove:
            y = y[..., : -self.remove]
        return F.gelu(F.layer_norm(y.transpose(1, 2), (y.shape[1],)).transpose(1, 2))


class ConvPositionalStack(nn.Module):
    """data2vec's relative positional encoder: ``depth`` :class:`PositionalConvLayer` of kernel
    ``max(3, width // depth)``. ``(B, L, D) -> (B, L, D)``; the caller adds the result to its input."""

    def __init__(self, dim: int, width: int, depth: int, groups: int):
        super().__init__()
        self.kernel = max(3, width // depth)
        self.layers = nn.ModuleList(PositionalConvLayer(dim, self.kernel, groups) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        y = x.transpose(1, 2)
        for layer in self.layers:
            y = layer(y)
        return y.transpose(1, 2)


class Data2Vec2Encoder(nn.Module):
    """Context network: positional convolutions, LayerNorm, Transformer layers with ALiBi.

    ``x (B, L, D) -> x + pos(x)`` (padded frames zeroed first when ``pos_conv_zero_padding``) -> [only the
    frames ``keep``] -> LayerNorm -> dropout -> layers ``1 .. prenet_depth`` -> ``dropout_input`` -> the other
    layers (fairseq: the modality prenet's ``context_encoder``, then the shared ``blocks``). The layers are
    :class:`~speechssl.models.components.TransformerLayer` (post-LN) with an attention bias.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.pos_conv = ConvPositionalStack(D, cfg.conv_pos_width, cfg.conv_pos_depth, cfg.conv_pos_groups)
        self.layer_norm = nn.LayerNorm(D)
        self.dropout = Dropout(cfg.dropout)  # fairseq's prenet_dropout
        self.dropout_input = Dropout(cfg.dropout_input)
        self.layers = nn.ModuleList(
            TransformerLayer(D, cfg.encoder_ffn_embed_dim, H, cfg.dropout, cfg.attention_dropout,
                             cfg.activation_dropout, False, cfg.activation_fn)
            for _ in range(cfg.encoder_layers)
        )
        self.layers.apply(init_bert_params)
        self.prenet_depth = cfg.prenet_depth
        self.layerdrop = cfg.encoder_layerdrop
        self.zero_padding = cfg.pos_conv_zero_padding
        self.alibi_scale: Optional[nn.Parameter] = None
        if cfg.use_alibi_encoder:
            self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(H)), persistent=False)
            n = H if cfg.learned_alibi_scale_per_head else 1
            self.alibi_scale = nn.Parameter(torch.ones(n), requires_grad=cfg.learned_alibi_scale)

    def attention_bias(self, positions: Tensor) -> Optional[Tensor]:
        """ALiBi bias ``(B, H, N, N)`` fp32 between frames at ``positions`` (``(B, N)`` frame indices; B may be
        1): ``-slope_h * max(scale_h, 0) * |i - j|``. None without ALiBi."""
        if self.alibi_scale is None:
            return None
        slopes = self.alibi_slopes * self.alibi_scale.float().clamp(min=0)  # (H,)
        distance = (positions[:, :, None] - positions[:, None, :]).abs().float()  # (B, N, N)
        return distance[:, None] * -slopes[None, :, None, None]

    def _inputs(self, x: Tensor, padding_mask: Optional[Tensor],
                keep: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Positional convolutions, the kept frames, LayerNorm and dropout: ``(x, padding_mask, bias)`` for
        the first layer."""
        if padding_mask is not None and self.zero_padding:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)
        if keep is None:
            positions = torch.arange(x.shape[1], device=x.device)[None]
        else:
            positions = keep
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            padding_mask = None if padding_mask is None else padding_mask.gather(1, keep)
        return self.dropout(self.layer_norm(x)), padding_mask, self.attention_bias(positions)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, keep: Optional[Tensor] = None,
                output_layer: Optional[int] = None) -> tuple[Tensor, list[Tensor]]:
        """``x (B, L, D)`` -> ``(x, layer_results)``: ``(B, L, D)``, or ``(B, K, D)`` at the frames ``keep``
        (``(B, K)`` ascending indices; the student in pretraining). ``padding_mask`` ``(B, L)`` True at
        padded frames; ``output_layer`` (1-based) stops after that layer; ``layer_results`` the output of
        every layer that ran (LayerDrop, in training, skips some)."""
        if output_layer is not None and not 1 <= output_layer <= len(self.layers):
            raise ValueError(f"output_layer must be in [1, {len(self.layers)}], got {output_layer}")
        x, padding_mask, bias = self._inputs(x, padding_mask, keep)
        skip = [False] * len(self.layers)
        if self.training and self.layerdrop > 0:
            skip = (torch.rand(len(self.layers)) < self.layerdrop).tolist()  # host RNG: no device sync
        layer_results = []
        for i, layer in enumerate(self.layers):
            if i == self.prenet_depth:
                x = self.dropout_input(x)
            if not skip[i]:
                x = layer(x, padding_mask, bias)
                layer_results.append(x)
            if output_layer is not None and i + 1 == output_layer:
                break
        return x, layer_results

    def ffn_outputs(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> list[Tensor]:
        """The feed-forward outputs (before the residual add) of every layer after the prenet, ``(B, L, D)``
        each, every layer run (no LayerDrop): the teacher's target layers."""
        x, padding_mask, bias = self._inputs(x, padding_mask, None)
        outputs = []
        for i, layer in enumerate(self.layers):
            if i == self.prenet_depth:
                x = self.dropout_input(x)
            x, ffn = layer.forward_with_ffn(x, padding_mask, bias)
            if i >= self.prenet_depth:
                outputs.append(ffn)
        return outputs


class ConvDecoder(nn.Module):
    """data2vec 2.0's decoder (fairseq's ``Decoder1d``): ``layers`` x [grouped ``Conv1d(kernel, padding=kernel
    // 2)`` -> LayerNorm over channels without affine -> GELU, plus the block's input where the channel
    counts match], then ``Linear(decoder_dim, D)``. ``(B, L, D) -> (B, L, D)``."""

    def __init__(self, dim: int, decoder_dim: int, layers: int, kernel: int, groups: int):
        super().__init__()
        for name, channels in (("model.encoder_embed_dim", dim), ("model.decoder_dim", decoder_dim)):
            if channels % groups:
                raise ValueError(f"{name} ({channels}) must be divisible by model.decoder_groups ({groups})")
        self.blocks = nn.ModuleList(
            nn.Conv1d(dim if i == 0 else decoder_dim, decoder_dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(layers)
        )
        self.remove = 1 if kernel % 2 == 0 else 0
        self.proj = nn.Linear(decoder_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = x.transpose(1, 2)
        for conv in self.blocks:
            z = conv(y)
            if self.remove:
                z = z[..., : -self.remove]
            z = F.gelu(F.layer_norm(z.transpose(1, 2), (z.shape[1],)).transpose(1, 2))
            y = z + y if z.shape[1] == y.shape[1] else z
        return self.proj(y.transpose(1, 2))


def _check_config(cfg: ModelConfig) -> None:
    if cfg.frame_padding not in FRAME_PADDING_RULES:
        raise ValueError(f"model.frame_padding must be one of {', '.join(FRAME_PADDING_RULES)}, "
                         f"got '{cfg.frame_padding}'")
    if cfg.layer_norm_first:
        raise ValueError("model.layer_norm_first=true: speechssl's data2vec 2.0 is post-LN, as fairseq's published "
                         "audio models (base_audio_only_task, large_audio_only_task)")
    if not 0.0 <= cfg.mask_prob < 1.0:
        raise ValueError(f"model.mask_prob must be in [0, 1), got {cfg.mask_prob}")
    if not 0 <= cfg.prenet_depth < cfg.encoder_layers:
        raise ValueError(f"model.prenet_depth={cfg.prenet_depth} must be in [0, model.encoder_layers="
                         f"{cfg.encoder_layers})")
    if not 1 <= cfg.average_top_k_layers <= cfg.encoder_layers - cfg.prenet_depth:
        raise ValueError(f"model.average_top_k_layers={cfg.average_top_k_layers} must be in [1, "
                         f"{cfg.encoder_layers - cfg.prenet_depth}] (the layers after the prenet)")
    if cfg.feature_grad_mult < 0:
        raise ValueError(f"model.feature_grad_mult must be >= 0 (0 freezes the extractor), got {cfg.feature_grad_mult}")


class Data2Vec2Model(nn.Module):
    """data2vec 2.0 built from a :class:`~speechssl.config.ModelConfig` (``name: data2vec2``; see the module
    docstring). Submodules: ``feature_extractor``, ``feature_projection`` (always a Linear, as fairseq's
    ``project_features``), ``encoder`` (:class:`Data2Vec2Encoder`), ``decoder`` (:class:`ConvDecoder`) and
    ``teacher`` (an EMA copy of ``encoder``, no gradient, always in eval mode). Weight names:
    :mod:`speechssl.interop.data2vec` maps them to fairseq's and transformers'.
    """

    # the very same code as wav2vec 2.0's (it only uses cfg and feature_extractor): conv-length frame padding,
    # the front-end with feature_grad_mult
    frame_padding_mask = Wav2Vec2Model.frame_padding_mask
    extract_conv_features = Wav2Vec2Model.extract_conv_features

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        D = cfg.encoder_embed_dim
        self.feature_extractor = build_feature_extractor(cfg)
        self.feature_projection = FeatureProjection(self.feature_extractor.out_channels, D, 0.0, always_project=True)
        self.encoder = Data2Vec2Encoder(cfg)
        self.decoder: Optional[ConvDecoder] = ConvDecoder(D, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel,
                                                          cfg.decoder_groups)
        self.teacher: Optional[Data2Vec2Encoder] = copy.deepcopy(self.encoder).requires_grad_(False)
        self.num_updates = 0

    def train(self, mode: bool = True) -> "Data2Vec2Model":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout, no LayerDrop: the teacher's targets are deterministic
        return self

    # ---------------------------------------------------------------------------------------------
    # The teacher

    def set_num_updates(self, num_updates: int) -> None:
        """The update count (for the ``ema_decay`` log); the teacher moves in :meth:`update_teacher`."""
        self.num_updates = num_updates

    def ema_decay_at(self, num_updates: int) -> float:
        """The teacher's decay for update ``num_updates``: linear from ``ema_decay`` (update 0) to
        ``ema_end_decay`` (update ``ema_anneal_end_step`` and after); fairseq's ``get_annealed_rate``."""
        cfg = self.cfg
        start, end = cfg.ema_decay, cfg.ema_end_decay
        if start == end:
            return start
        if num_updates >= cfg.ema_anneal_end_step:
            return end
        return end - (end - start) * (1 - num_updates / cfg.ema_anneal_end_step)

    @torch.no_grad()
    def update_teacher(self, num_updates: int) -> None:
        """The EMA step after the optimizer step that made update ``num_updates``: with ``d =
        ema_decay_at(num_updates)``, every teacher parameter becomes ``d * teacher + (1 - d) * student`` (as
        fairseq's ``EMAModule``: ``mul_(1 - lr)``, ``add_(student, alpha=lr)``, ``lr = 1 - d``); a parameter the
        student does not train (``learned_alibi_scale: false``) is copied. Nothing happens when ``d >= 1`` or
        the teacher was removed."""
        if self.teacher is None:
            return
        decay = self.ema_decay_at(num_updates)
        if decay >= 1.0:
            return
        lr = 1.0 - decay
        ema, new = [], []
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters()):
            if s.requires_grad:
                ema.append(t)
                new.append(s.detach().to(t.dtype))
            else:
                t.copy_(s)
        if ema:
            torch._foreach_mul_(ema, 1.0 - lr)
            torch._foreach_add_(ema, new, alpha=lr)

    def make_targets(self, layers: list[Tensor]) -> Tensor:
        """Targets ``(B, L, D)`` fp32 from the teacher's per-layer outputs ``[(B, L, D), ...]`` (fairseq's
        ``make_targets``): the mean of the top ``average_top_k_layers``, each instance-normalised over time
        (``instance_norm_target_layer``: every channel of every utterance to zero mean, unit variance, eps
        1e-5) and/or layer-normalised over channels (``layer_norm_target_layer``), the mean then optionally
        layer- / instance-normalised (``layer_norm_targets`` / ``instance_norm_targets``)."""
        cfg = self.cfg
        top = layers[-cfg.average_top_k_layers:]
        with torch.autocast(device_type=top[0].device.type, enabled=False):
            total = None
            for t in top:
                t = t.float()
                if cfg.instance_norm_target_layer:
                    t = F.instance_norm(t.transpose(1, 2)).transpose(1, 2)
                if cfg.layer_norm_target_layer:
                    t = F.layer_norm(t, t.shape[-1:])
                total = t if total is None else total + t
            y = total / len(top)
            if cfg.layer_norm_targets:
                y = F.layer_norm(y, y.shape[-1:])
            if cfg.instance_norm_targets:
                y = F.instance_norm(y.transpose(1, 2)).transpose(1, 2)
        return y

    # ---------------------------------------------------------------------------------------------
    # Masking

    def random_mask(self, shape: torch.Size, padding_mask: Optional[Tensor],
                    device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Fine-tuning's span mask ``(B, L)`` and its ``covered`` rows (fairseq's data2vec 2.0 ``compute_mask``:
        ``compute_mask_indices`` with ``min_masks=1``), or ``(None, None)`` when ``mask_prob`` is 0."""
        cfg = self.cfg
        if cfg.mask_prob <= 0:
            return None, None
        return span_mask(tuple(shape), padding_mask, cfg.mask_prob, cfg.mask_length, cfg.mask_selection,
                         cfg.mask_other, min_masks=1, require_same_masks=cfg.require_same_masks,
                         mask_dropout=cfg.mask_dropout, device=device)

    def apply_mask(self, x: Tensor, mask_indices: Optional[Tensor]) -> Tensor:
        """Fine-tuning: masked frames of ``x (B, L, D)`` become N(0, ``mask_noise_std``) noise (fairseq's
        ``encoder_zero_mask: false``), masked channels zeros."""
        cfg = self.cfg
        if mask_indices is not None:
            noise = torch.randn_like(x) * cfg.mask_noise_std
            x = torch.where(mask_indices.unsqueeze(-1), noise, x)
        if cfg.mask_channel_prob > 0:
            channels, _ = span_mask((x.shape[0], x.shape[2]), None, cfg.mask_channel_prob, cfg.mask_channel_length,
                                    cfg.mask_channel_selection, cfg.mask_channel_other, device=x.device)
            x = x.masked_fill(channels.unsqueeze(1), 0.0)
        return x

    # ---------------------------------------------------------------------------------------------

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, mask: bool = True,
                features_only: bool = False, output_layer: Optional[int] = None,
                mask_indices: Optional[Tensor] = None) -> dict[str, Any]:
        """Run the model.

        Args:
            source: ``(B, T)`` float waveform.
            padding_mask: ``(B, T)`` bool, True at padded samples, or None (pretraining: always None).
            mask: pretraining: must be True; features only: span masking for fine-tuning (time: noise,
                channels: zeros, as configured).
            features_only: the student encoder's output only (an upstream: fine-tuning, probes, extract).
            output_layer: 1-based encoder layer to stop at (features only).
            mask_indices: bool frame mask to use instead of a random one: ``(B, L)`` (features only), or the
                ``(B', L)`` mask of every copy in pretraining, each row with exactly ``int(L * mask_prob)``
                masked frames (as :func:`~speechssl.models.masking.block_mask` draws them).

        Features only: a dict with ``x`` ``(B, L, D)``, ``padding_mask`` ``(B, L)`` frame-level or None,
        ``layer_results`` (every layer's output), ``mask_indices`` ``(B, L)`` or None.

        Pretraining: ``pred`` and ``targets`` ``(B', M, D)`` at the ``M`` masked frames of each of the ``B' = B
        * clone_batch`` rows (row ``b * clone_batch + c`` is copy ``c`` of utterance ``b``), ``mask_indices``
        ``(B', L)``, and host numbers ``masked_pct`` (M / L) and ``ema_decay``. Nothing is read on the host.
        """
        if source.dim() != 2:
            raise ValueError(f"source must be (batch, samples), got shape {tuple(source.shape)}")
        if padding_mask is not None and padding_mask.shape != source.shape:
            raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} != source shape {tuple(source.shape)}")
        conv = self.extract_conv_features(source, padding_mask)
        frame_pad = self.frame_padding_mask(padding_mask, conv.shape[1])
        features, _ = self.feature_projection(conv)
        if features_only:
            return self._features(features, frame_pad, mask, output_layer, mask_indices)
        if not mask:
            raise ValueError("pretraining outputs need masked frames: call with mask=True, or features_only=True")
        if frame_pad is not None:
            raise ValueError("data2vec 2.0 pretraining takes cropped batches without padding (task.enable_padding="
                             "false): the student encodes the same number of frames of every row")
        return self._pretraining_outputs(features, mask_indices)

    def _features(self, x: Tensor, frame_pad: Optional[Tensor], mask: bool, output_layer: Optional[int],
                  mask_indices: Optional[Tensor]) -> dict[str, Any]:
        covered = None
        if mask:
            if mask_indices is None:
                mask_indices, covered = self.random_mask(x.shape[:2], frame_pad, x.device)
            x = self.apply_mask(x, mask_indices)
        else:
            mask_indices = None
        counts = HostCopy(covered) if covered is not None else None  # read once the encoder is queued
        x, layer_results = self.encoder(x, frame_pad, output_layer=output_layer)
        if counts is not None:
            check_covered(counts.get(), self.cfg.mask_length, min_masks=1)
        return {"x": x, "padding_mask": frame_pad, "layer_results": layer_results, "mask_indices": mask_indices}

    def _pretraining_outputs(self, features: Tensor, mask: Optional[Tensor] = None) -> dict[str, Any]:
        if self.teacher is None or self.decoder is None:
            raise ValueError("this data2vec 2.0 model has no teacher / decoder (removed for fine-tuning): it gives "
                             "features only")
        cfg = self.cfg
        B, L, D = features.shape
        R = cfg.clone_batch
        M = int(L * cfg.mask_prob)
        if not 1 <= M < L:
            raise ValueError(f"{L} frames with model.mask_prob={cfg.mask_prob} mask {M}: need at least one masked "
                             "and one unmasked frame; drop shorter inputs (task.min_sample_size)")
        with torch.no_grad():  # one teacher pass for all clone_batch copies
            targets = self.make_targets(self.teacher.ffn_outputs(features.detach()))  # (B, L, D) fp32
        x = features.unsqueeze(1).expand(B, R, L, D).reshape(B * R, L, D)  # each utterance R times, in a row
        if mask is None:
            mask = block_mask((B * R, L), cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust, device=x.device)
        elif mask.shape != (B * R, L):
            raise ValueError(f"mask_indices of shape {tuple(mask.shape)}: pretraining takes one mask per copy, "
                             f"({B * R}, {L})")
        keep = mask_positions(~mask, L - M)  # (B', K') ascending: x[~mask] without a host sync
        masked = mask_positions(mask, M)  # (B', M)
        x = x.masked_fill(mask.unsqueeze(-1), 0.0)  # fairseq's encoder_zero_mask, for the positional convolutions
        x, _ = self.encoder(x, None, keep=keep)  # (B', K', D)
        pred = self.decoder(self.decoder_input(x, keep, L))  # (B', L, D)
        pred = pred.gather(1, masked.unsqueeze(-1).expand(-1, -1, D))
        rows = torch.arange(B * R, device=x.device).div(R, rounding_mode="floor").unsqueeze(1)  # utterance of a row
        targets = targets.reshape(B * L, D).index_select(0, (rows * L + masked).reshape(-1)).view(B * R, M, D)
        return {"pred": pred, "targets": targets, "mask_indices": mask, "masked_pct": M / L,
                "ema_decay": self.ema_decay_at(self.num_updates)}

    def decoder_input(self, x: Tensor, keep: Tensor, num_frames: int) -> Tensor:
        """The student's ``(B', K', D)`` outputs at the frames ``keep`` (after ``decoder_input_dropout``) at their
        positions of a ``(B', num_frames, D)`` sequence whose other frames are N(0, ``mask_noise_std``) noise
        (fairseq's ``decoder_input``)."""
        x = dropout(x, self.cfg.decoder_input_dropout, self.training)
        noise = x.new_empty(x.shape[0], num_frames, x.shape[2]).normal_(0.0, self.cfg.mask_noise_std)
        return noise.scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)


# --------------------------------------------------------------------------------------------------
# Published configurations
# --------------------------------------------------------------------------------------------------


def data2vec2_base_config() -> ModelConfig:
    """data2vec 2.0 BASE audio (fairseq ``examples/data2vec/config/v2/base_audio_only_task.yaml``): 12 x 768
    post-LN layers with ALiBi, layer-norm conv front-end, 5 positional convolutions of kernel 19; ~94M
    parameters in the student (the teacher copies its encoder)."""
    return ModelConfig(
        name="data2vec2",
        extractor_mode="layer_norm", conv_feature_layers=list(BASE_CONV_LAYERS), conv_bias=False,
        feature_grad_mult=1.0,
        encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
        activation_fn="gelu", layer_norm_first=False,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, encoder_layerdrop=0.05,
        dropout_input=0.0, dropout_features=0.0, conv_pos_groups=16,
        conv_pos_depth=5, conv_pos_width=95, pos_conv_zero_padding=False,
        use_alibi_encoder=True, learned_alibi_scale=True, learned_alibi_scale_per_head=True, prenet_depth=0,
        quantize_targets=False, final_dim=0,
        mask_prob=0.5, mask_prob_adjust=0.05, mask_length=5, mask_noise_std=0.01, mask_dropout=0.0,
        clone_batch=8,
        decoder_dim=384, decoder_layers=4, decoder_kernel=7, decoder_groups=16, decoder_input_dropout=0.1,
        average_top_k_layers=8, instance_norm_target_layer=True, layer_norm_target_layer=False,
        instance_norm_targets=False, layer_norm_targets=False,
        ema_decay=0.999, ema_end_decay=0.99999, ema_anneal_end_step=75000,
        loss_beta=0.0, loss_scale=None,
    )


def data2vec2_large_config() -> ModelConfig:
    """data2vec 2.0 LARGE audio (fairseq ``large_audio_only_task.yaml``): a prenet of 8 layers and 16 shared
    layers (24 x 1024 in all), 16 heads, no LayerDrop, 12 copies, mask_prob 0.55 (+0.1), decoder 768,
    targets from all 16 shared layers, EMA 0.9997 -> 1.0 over 300k updates."""
    return replace(
        data2vec2_base_config(),
        encoder_layers=24, prenet_depth=8, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096,
        encoder_attention_heads=16, encoder_layerdrop=0.0,
        clone_batch=12, mask_prob=0.55, mask_prob_adjust=0.1, decoder_dim=768,
        average_top_k_layers=16, ema_decay=0.9997, ema_end_decay=1.0, ema_anneal_end_step=300000,
    )


def data2vec2_tiny_config() -> ModelConfig:
    """A small model with BASE's structure for tests: 32 conv channels, 3 layers x 48 dims (4 heads),
    2 positional convolutions of kernel 3, decoder 2 x 32, targets from the top 2 layers, 2 copies."""
    return replace(
        data2vec2_base_config(),
        conv_feature_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        encoder_layers=3, encoder_embed_dim=48, encoder_ffn_embed_dim=96, encoder_attention_heads=4,
        encoder_layerdrop=0.0, conv_pos_groups=4, conv_pos_depth=2, conv_pos_width=6,
        clone_batch=2, mask_length=3, decoder_dim=32, decoder_layers=2, decoder_kernel=3, decoder_groups=4,
        average_top_k_layers=2, ema_anneal_end_step=100,
    )


def data2vec2_base() -> Data2Vec2Model:
    return Data2Vec2Model(data2vec2_base_config())


def data2vec2_large() -> Data2Vec2Model:
    return Data2Vec2Model(data2vec2_large_config())


def data2vec2_tiny() -> Data2Vec2Model:
    return Data2Vec2Model(data2vec2_tiny_config())
