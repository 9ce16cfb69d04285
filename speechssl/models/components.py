"""Building blocks of wav2vec 2.0 / HuBERT: waveform front-end, feature projection, Transformer encoder.

Semantics follow fairseq (``fairseq/models/wav2vec/wav2vec2.py``); names follow fairseq where it has one,
so that weight conversion (:mod:`speechssl.models.weights`) is a short, documented table. Shapes:
``B`` batch, ``T`` waveform samples, ``L`` frames, ``C`` conv channels, ``D`` model dim.

Three CPU-specific speed choices, with identical semantics (documented where they are used):

* :func:`dropout` draws its keep-mask by comparing 16-bit integers cut from 64-bit random words instead
  of ``torch.bernoulli`` (3-4x faster on CPU, where mask generation is a visible share of a BASE step; a
  drop probability ``p`` is realised as ``round(p * 2**16) / 2**16``, e.g. 0.1000061 for 0.1).
* :class:`SelfAttention` uses ``scaled_dot_product_attention``'s fused kernel, except on CPU where SDPA
  falls back to its slow math path: with attention dropout, or with an additive bias that needs a gradient
  (data2vec 2.0's ALiBi with its learned scales). There it computes the same
  softmax(QK^T / sqrt(d) + bias) -> dropout -> V explicitly (the math path upcasts bf16 to fp32, matmuls
  included: the attention layer with ALiBi runs 1.8x faster in bf16, ``tools/bench_attention.py``, and
  data2vec 2.0 tiny's CTC fine-tuning 1.55x).
* the first (group-norm) conv layer runs channels-last end to end (:class:`ConvBlock`): one matmul of
  the waveform's frames, its per-channel statistics from the frames' covariance
  (:func:`frame_conv_stats`) and :class:`_ChannelNormNLC`, so the largest activation is never
  transposed (forward + backward of that layer about 2x faster on CPU).

On other devices (CUDA) the conv feature extractor runs channels-first with ``F.conv1d`` (cuDNN) and an
fp32 ``GroupNorm``, as fairseq (:meth:`ConvFeatureExtractor.forward_channels_first`): the strided-matmul
convolution issues its GEMMs per utterance, a Python loop that would starve a GPU.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------------
# Dropout and gradient scaling
# --------------------------------------------------------------------------------------------------


def _keep_mask(shape: torch.Size, p: float) -> Tensor:
    """Bool tensor of ``shape``, each element True with probability ``1 - round(p * 2**16) / 2**16``."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # 64 uniform random bits
    return words.view(torch.int16)[:n].ge(round(p * 65536) - 32768).view(shape)  # four 16-bit draws per word


class _CPUDropout(torch.autograd.Function):
    """``x * keep / (1 - p)``; saves the bool keep-mask (1 byte/element) like ``torch.native_dropout``."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        keep = _keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)  # where: no mixed bool/float arithmetic

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, as ``F.dropout``; a faster mask generator on CPU (see module docstring)."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return _CPUDropout.apply(x, p)


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout`'s CPU fast path. Any shape."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GradMultiply(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (fairseq's ``feature_grad_mult``)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


# --------------------------------------------------------------------------------------------------
# Convolutional feature extractor
# --------------------------------------------------------------------------------------------------


class _StridedConvNLC(torch.autograd.Function):
    """Strided 1-D convolution on channels-last frames, as matmuls on strided views of the input.

    ``y[b, t] = sum_j x[b, s*t + j] @ w[j]`` for taps ``j < k``. The taps are taken ``s`` at a time:
    taps ``j0 .. j0+s-1`` of all output frames of utterance ``b`` form a strided ``(L_out, s*C_in)`` view
    of ``x[b]`` (row ``t`` starts at frame ``s*t + j0``), so each block is one GEMM with no im2col copy,
    and the input gradient accumulates each block's GEMM into the same (non-overlapping) view of a zero
    tensor. For the wav2vec 2.0 stack (k=3, s=2 and k=2, s=2) that is 1-2 GEMMs per utterance and layer;
    on CPU, forward + backward is 1.1-1.7x faster than oneDNN's ``conv1d`` for the BASE layers (fp32, 2
    threads; its input gradient is a strided transposed convolution). GEMMs are issued per utterance
    (``mm``/``addmm_`` take the strided views as they are; batched ``bmm`` copies them for bf16).

    x: ``(B, L_in, C_in)`` contiguous; w: ``(k, C_in, C_out)`` contiguous; returns ``(B, L_out, C_out)``.
    """

    @staticmethod
    def _taps(x: Tensor, k: int, s: int, L_out: int):
        """(j0, j1, view(t) of x[b]) for each block of taps: rows s*t + j0 .. s*t + j1 - 1, flattened."""
        C = x.shape[2]
        for j0 in range(0, k, s):
            j1 = min(k, j0 + s)
            yield j0, j1, lambda t, j0=j0, j1=j1: t.as_strided((L_out, (j1 - j0) * C), (s * C, 1),
                                                                t.storage_offset() + j0 * C)

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, stride: int) -> Tensor:  # type: ignore[override]
        k, _, c_out = w.shape
        L_out = (x.shape[1] - k) // stride + 1
        y = x.new_empty(x.shape[0], L_out, c_out)
        for b in range(x.shape[0]):
            for j0, j1, taps in _StridedConvNLC._taps(x, k, stride, L_out):
                wj = w[j0:j1].view(-1, c_out)
                if j0 == 0:
                    torch.mm(taps(x[b]), wj, out=y[b])
                else:
                    y[b].addmm_(taps(x[b]), wj)
        ctx.save_for_backward(x, w)
        ctx.stride = stride
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        k, c_in, c_out = w.shape
        grad = grad.contiguous()
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gw = w.new_empty(x.shape[0], k, c_in, c_out) if ctx.needs_input_grad[1] else None
        for b in range(x.shape[0]):
            for j0, j1, taps in _StridedConvNLC._taps(x, k, ctx.stride, grad.shape[1]):
                if gx is not None:
                    taps(gx[b]).addmm_(grad[b], w[j0:j1].view(-1, c_out).t())
                if gw is not None:
                    torch.mm(taps(x[b]).t(), grad[b], out=gw[b, j0:j1].view(-1, c_out))
        if gw is not None:
            gw = gw.sum(dim=0, dtype=torch.promote_types(w.dtype, torch.float32)).to(w.dtype)
        return gx, gw, None


def conv1d_nlc(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """``F.conv1d`` (no padding, no bias) on channels-last input. ``(B, L_in, C_in) -> (B, L_out, C_out)``.

    ``weight`` has ``nn.Conv1d``'s layout ``(C_out, C_in, k)``. Follows autocast like ``F.conv1d``.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return _StridedConvNLC.apply(x.contiguous(), weight.permute(2, 1, 0).contiguous(), stride)


def frame_conv_stats(frames: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Mean and variance over time, ``(B, 1, C)`` fp32, of ``frames @ weight.T (+ bias)``.

    ``frames``: ``(B, L, k)`` windows of the waveform; ``weight``: ``(C, k)``. Computed from the frames'
    ``(k, k)`` covariance in fp64 (``var_c = w_c^T Cov w_c``): the exact statistics of the first conv
    layer's output without a pass over that ``(B, L, C)`` tensor (the largest activation of the network;
    a reduction over its time axis costs more than the convolution). No gradient (the norm's backward
    does not need one).
    """
    with torch.no_grad():
        f = frames.double()
        mu = f.mean(dim=1)  # (B, k)
        cov = f.transpose(1, 2) @ f / f.shape[1] - mu[:, :, None] * mu[:, None, :]  # (B, k, k)
        w = weight.double()
        mean = mu @ w.t()  # (B, C)
        if bias is not None:
            mean = mean + bias.double()
        var = torch.einsum("ck,bkj,cj->bc", w, cov, w).clamp_(min=0.0)
        return mean.float().unsqueeze(1), var.float().unsqueeze(1)


class _ChannelNormNLC(torch.autograd.Function):
    """``nn.GroupNorm(C, C)`` (each channel normalised over time, fp32 statistics) on channels-last frames.

    Same values as ``GroupNorm`` of the ``(B, C, L)`` transpose, without the two transposes of the
    largest activation of the network (the first conv layer's output) and without GELU's backward on a
    transposed gradient (3-4x slower than on a contiguous one on CPU). Output in the input's dtype.

    y: ``(B, L, C)``; weight, bias: ``(C,)``; mean, var: ``(B, 1, C)`` statistics of ``y`` over time
    (:func:`frame_conv_stats`), or None to compute them. Returns ``(B, L, C)``.
    """

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, bias: Tensor, eps: float, mean: Optional[Tensor] = None,
                var: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        yf = y.float()
        if mean is None or var is None:
            var, mean = torch.var_mean(yf, dim=1, correction=0, keepdim=True)  # (B, 1, C)
        rstd = (var + eps).rsqrt()
        scale = rstd * weight.float()
        out = torch.addcmul(bias.float() - mean * scale, yf, scale)  # one pass: y * scale + shift
        ctx.save_for_backward(y, mean, rstd, weight)
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, mean, rstd, weight = ctx.saved_tensors
        g = grad.float()
        xhat = (y.float() - mean) * rstd
        g_sum = g.sum(dim=1, keepdim=True)  # (B, 1, C)
        gx_sum = (g * xhat).sum(dim=1, keepdim=True)
        L = y.shape[1]
        w = weight.float()
        grad_y = None
        if ctx.needs_input_grad[0]:
            # d/dy of w * xhat: rstd * w * (g - mean_L(g) - xhat * mean_L(g * xhat))
            grad_y = (g - g_sum / L).sub_(xhat.mul_(gx_sum / L)).mul_(rstd * w).to(y.dtype)
        gw, gb = gx_sum.sum(dim=(0, 1)).to(weight.dtype), g_sum.sum(dim=(0, 1)).to(weight.dtype)
        return grad_y, gw, gb, None, None, None


class ConvBlock(nn.Module):
    """Conv1d -> optional norm -> GELU on channels-last frames. ``(B, L_in, C_in) -> (B, L_out, C_out)``.

    norm: None, ``"group"`` (GroupNorm with one group per channel: normalises each channel over time; only
    used on the first layer, where ``C_in = 1``: the convolution is then one matmul of the waveform's
    ``(B, L, kernel)`` frames with the weights, and the norm :class:`_ChannelNormNLC`, both channels-last)
    or ``"layer"`` (LayerNorm over channels). Parameters: ``conv`` (an ``nn.Conv1d``) and ``norm``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool,
                 norm: Optional[str]):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm_type = norm
        self.norm: Optional[nn.Module] = None
        if norm == "group":
            if in_channels != 1:
                raise ValueError("the group-norm conv block is the first layer (one input channel)")
            self.norm = nn.GroupNorm(out_channels, out_channels)
        elif norm == "layer":
            self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Channels-last, the CPU path: ``(B, L_in, C_in) -> (B, L_out, C_out)``."""
        if self.norm_type == "group":
            C, _, k = self.conv.weight.shape
            frames = x.reshape(x.shape[0], -1).unfold(1, k, self.conv.stride[0])  # (B, L, k) view
            weight = self.conv.weight.view(C, k)
            y = torch.matmul(frames, weight.t())  # (B, L, C); autocast as conv1d
            if self.conv.bias is not None:
                y = y + self.conv.bias.to(y.dtype)
            mean, var = frame_conv_stats(frames, weight, self.conv.bias)
            return F.gelu(_ChannelNormNLC.apply(y, self.norm.weight, self.norm.bias, self.norm.eps, mean, var))
        y = conv1d_nlc(x, self.conv.weight, self.conv.stride[0])
        if self.conv.bias is not None:
            y = y + self.conv.bias.to(y.dtype)
        if self.norm is not None:
            y = self.norm(y)
        return F.gelu(y)

    def forward_channels_first(self, x: Tensor) -> Tensor:
        """Channels-first, the cuDNN path (fairseq's layout): ``(B, C_in, L_in) -> (B, C_out, L_out)``.

        Same values as :meth:`forward`: the group norm takes fp32 statistics and returns the conv output's
        dtype (fairseq's ``Fp32GroupNorm``); the layer norm normalises over channels (transposed there and
        back, as fairseq's ``TransposeLast``)."""
        y = self.conv(x)
        if self.norm_type == "group":
            y = F.group_norm(y.float(), self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps).to(y.dtype)
        elif self.norm is not None:
            y = self.norm(y.transpose(1, 2)).transpose(1, 2)
        return F.gelu(y)


EXTRACTOR_MODES = ("default", "group_norm", "layer_norm")


class ConvFeatureExtractor(nn.Module):
    """Waveform -> frame features: a stack of strided 1-D convolutions.

    Args:
        conv_layers: ``[(channels, kernel, stride), ...]``; BASE/LARGE use
            ``[(512,10,5)] + [(512,3,2)]*4 + [(512,2,2)]*2`` (320x downsampling, 20 ms frames at 16 kHz).
        mode: ``"default"`` / ``"group_norm"`` (BASE: GroupNorm with one group per channel on the first
            layer only) or ``"layer_norm"`` (LARGE: LayerNorm over channels after every conv).
        conv_bias: bias in the convolutions (False for BASE, True for LARGE).

    fairseq computes these norms in fp32 (``Fp32GroupNorm``/``Fp32LayerNorm``) for fp16 training. Here
    the group norm takes fp32 statistics (:func:`frame_conv_stats`) and the layer norms run on the conv
    output's dtype: torch's CPU kernels accumulate bf16/fp16 statistics in fp32 and CUDA autocast runs
    layer norm in fp32, so the explicit round trip through fp32 copies of the largest activation
    (``(B, 512, T/5)``) is not needed. Frames are kept channels-last ``(B, L, C)``
    between layers (:func:`conv1d_nlc`), which also makes LARGE's LayerNorm a plain last-axis norm.

    Two layouts with the same values: channels-last (:meth:`forward_channels_last`) on the CPU, where the
    strided-matmul convolution is fastest, and channels-first (:meth:`forward_channels_first`: cuDNN's
    ``conv1d``, one transpose at the end) on other devices.

    Input ``(B, T)`` waveform; output ``(B, L, C)`` with ``L = output_lengths(T)``.
    """

    def __init__(self, conv_layers: Sequence[tuple[int, int, int]], mode: str = "default", conv_bias: bool = False):
        super().__init__()
        if mode not in EXTRACTOR_MODES:
            raise ValueError(f"model.extractor_mode must be one of {EXTRACTOR_MODES}, got '{mode}'")
        if not conv_layers:
            raise ValueError("model.conv_feature_layers is empty: give at least one (channels, kernel, stride)")
        self.spec = [tuple(int(v) for v in layer) for layer in conv_layers]
        blocks = []
        in_channels = 1
        for i, (channels, kernel, stride) in enumerate(self.spec):
            norm = "layer" if mode == "layer_norm" else ("group" if i == 0 else None)
            blocks.append(ConvBlock(in_channels, channels, kernel, stride, conv_bias, norm))
            in_channels = channels
        self.conv_layers = nn.ModuleList(blocks)
        self.out_channels = in_channels

    def forward(self, source: Tensor) -> Tensor:
        if source.dim() != 2:
            raise ValueError(f"expected a (batch, samples) waveform, got shape {tuple(source.shape)}")
        if self.num_frames(source.shape[1]) < 1:
            raise ValueError(f"input of {source.shape[1]} samples is shorter than the conv stack's receptive "
                             "field; drop such inputs (task.min_sample_size)")
        if source.device.type == "cpu":
            return self.forward_channels_last(source)
        return self.forward_channels_first(source)

    def forward_channels_last(self, source: Tensor) -> Tensor:
        """``(B, T) -> (B, L, C)`` with frames channels-last through the stack (the CPU path)."""
        x = source.unsqueeze(-1)  # (B, T, 1)
        for block in self.conv_layers:
            x = block(x)
        return x

    def forward_channels_first(self, source: Tensor) -> Tensor:
        """``(B, T) -> (B, L, C)`` through ``F.conv1d`` on ``(B, C, L)`` frames (the CUDA path)."""
        x = source.unsqueeze(1)  # (B, 1, T)
        for block in self.conv_layers:
            x = block.forward_channels_first(x)
        return x.transpose(1, 2)

    @property
    def stride(self) -> int:
        """Samples per output frame (the product of the strides: 320 for BASE / LARGE)."""
        return math.prod(s for _, _, s in self.spec)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Number of frames for inputs of ``lengths`` samples (any integer tensor shape; >= 0)."""
        for _, kernel, stride in self.spec:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=0)

    def num_frames(self, samples: int) -> int:
        """:meth:`output_lengths` of one host integer, in Python."""
        for _, kernel, stride in self.spec:
            samples = (samples - kernel) // stride + 1
        return max(samples, 0)


class FeatureProjection(nn.Module):
    """LayerNorm(C) -> Linear(C, D) -> dropout. ``(B, L, C) -> ((B, L, D), (B, L, C))``.

    Returns the projected features and the normalised (unprojected) features, which wav2vec 2.0
    quantizes into targets. fairseq names: ``layer_norm``, ``post_extract_proj``, ``dropout_input``.
    As fairseq, the Linear exists only when ``C != D`` (``projection`` is None otherwise: the normalised
    features go to the encoder as they are); torchaudio and transformers always have one (an identity
    on export, see :func:`speechssl.interop.names.upstream_to_reference`).
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float, always_project: bool = False):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim)
        project = always_project or in_dim != out_dim  # data2vec 2.0 always has the Linear (always_project)
        self.projection: Optional[nn.Linear] = nn.Linear(in_dim, out_dim) if project else None
        self.dropout = Dropout(dropout)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        normed = self.layer_norm(features)
        x = normed if self.projection is None else self.projection(normed)
        return self.dropout(x), normed


# --------------------------------------------------------------------------------------------------
# Transformer encoder
# --------------------------------------------------------------------------------------------------


class ConvPositionalEmbedding(nn.Module):
    """Relative positional information from a wide grouped convolution. ``(B, L, D) -> (B, L, D)``.

    ``Conv1d(D, D, kernel, padding=kernel // 2, groups)`` with weight normalisation over dim 2 (one
    norm per kernel tap, fairseq's ``weight_norm(dim=2)``), one trailing frame removed for an even
    kernel (fairseq's ``SamePad``), then GELU. The caller adds the result to its input.
    """

    def __init__(self, dim: int, kernel: int = 128, groups: int = 16):
        super().__init__()
        if dim % groups:
            raise ValueError(f"model.encoder_embed_dim ({dim}) must be divisible by model.conv_pos_groups ({groups})")
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=(4.0 / (kernel * dim)) ** 0.5)
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.remove:
            y = y[..., : -self.remove]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused Q/K/V projection. ``(B, L, D) -> (B, L, D)``.

    ``qkv_proj.weight`` is ``cat([q_proj.weight, k_proj.weight, v_proj.weight])`` (same for the bias)
    of fairseq / torchaudio / transformers' separate projections; scaling ``1 / sqrt(D / heads)``.

    Args (forward):
        x: ``(B, L, D)``.
        key_padding_mask: ``(B, L)`` bool, True at padded frames (never attended to), or None.
        attn_bias: ``(B or 1, heads, L, L)`` float added to the attention logits (data2vec 2.0's ALiBi), or None.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.encoder_embed_dim ({dim}) must be divisible by "
                             f"model.encoder_attention_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv_proj(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and (p > 0.0 or (attn_bias is not None and attn_bias.requires_grad)):
            out = self._explicit(q, k, v, attend, attn_bias, p)
        else:
            if attn_bias is not None:  # a float mask: the bias, -inf at padded keys
                bias = attn_bias.to(q.dtype)
                attend = bias if attend is None else bias.masked_fill(~attend, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, attend: Optional[Tensor], bias: Optional[Tensor],
                  p: float) -> Tensor:
        """softmax(QK^T / sqrt(d) + bias) -> dropout -> V; the bias in the inputs' dtype, as the fused path
        gets it (CPU's softmax accumulates bf16 in fp32). ``attend``: bool ``(B, 1, 1, L)`` or None."""
        scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(-2, -1))  # (B, H, L, L)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        if attend is not None:
            scores = scores.masked_fill(~attend, float("-inf"))
        return torch.matmul(dropout(scores.softmax(-1), p, True), v)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class TransformerLayer(nn.Module):
    """One encoder layer, post-LN (BASE) or pre-LN (``layer_norm_first``, LARGE). ``(B, L, D) -> (B, L, D)``.

    post-LN: ``x = LN1(x + drop(attn(x))); x = LN2(x + drop(fc2(act_drop(act(fc1(x))))))``
    pre-LN:  ``x = x + drop(attn(LN1(x))); x = x + drop(fc2(act_drop(act(fc1(LN2(x))))))``
    (``LN1 = self_attn_layer_norm``, ``LN2 = final_layer_norm``, as fairseq; ``act`` GELU by default).
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, layer_norm_first: bool, activation_fn: str = "gelu"):
        super().__init__()
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"model.activation_fn must be one of {sorted(ACTIVATIONS)}, got '{activation_fn}'")
        self.activation = ACTIVATIONS[activation_fn]
        self.self_attn = SelfAttention(dim, num_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(activation_dropout)
        self.dropout3 = Dropout(dropout)
        self.layer_norm_first = layer_norm_first

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout3(self.fc2(self.dropout2(self.activation(self.fc1(x)))))

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None) -> Tensor:
        return self.forward_with_ffn(x, key_padding_mask, attn_bias)[0]

    def forward_with_ffn(self, x: Tensor, key_padding_mask: Optional[Tensor] = None,
                         attn_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The layer's output and its feed-forward block's output ``fc2(...)`` before the residual add (and, for
        post-LN, before LN2): data2vec's per-layer targets (fairseq's ``AltBlock`` with ``ffn_targets``).
        ``attn_bias``: see :class:`SelfAttention`."""
        if self.layer_norm_first:
            x = x + self.dropout1(self.self_attn(self.self_attn_layer_norm(x), key_padding_mask, attn_bias))
            ffn = self._ffn(self.final_layer_norm(x))
            return x + ffn, ffn
        x = self.self_attn_layer_norm(x + self.dropout1(self.self_attn(x, key_padding_mask, attn_bias)))
        ffn = self._ffn(x)
        return self.final_layer_norm(x + ffn), ffn


def compile_transformer_layers(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every :class:`TransformerLayer` of ``model`` in place (``dynamic=True``: batch size and
    length vary from batch to batch), as ``common.compile: true`` does. Returns the number of layers.

    Only the layers: the extractor, masking, quantizer and heads have data-dependent shapes and stay eager;
    LayerDrop decides outside the layers. Parameter names and the state dict do not change."""
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


def init_bert_params(module: nn.Module) -> None:
    """fairseq's ``init_bert_params`` for the encoder: Linear weights ~ N(0, 0.02), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TransformerEncoder(nn.Module):
    """Context network: positional convolution + Transformer layers. ``(B, L, D) -> (B, L, D)``.

    forward(x, padding_mask, output_layer) -> (x, layer_results):
        padding_mask: ``(B, L)`` bool, True at padded frames; those frames are zeroed before the
            positional convolution (as fairseq) and never attended to.
        output_layer: 1-based; stop after that layer and return its output (no final LayerNorm), as
            fairseq's ``layer=output_layer - 1``. None runs every layer.
        layer_results: the output of every layer that ran, ``[(B, L, D), ...]`` (LayerDrop, active in
            training only, skips layers; skipped layers are absent from the list).

    post-LN (BASE): ``x = LN(x + pos(x))`` -> dropout -> layers. pre-LN (LARGE): ``x + pos(x)`` ->
    dropout -> layers -> ``LN``.
    """

    def __init__(self, dim: int, ffn_dim: int, num_layers: int, num_heads: int, dropout: float,
                 attention_dropout: float, activation_dropout: float, layer_norm_first: bool, layerdrop: float,
                 conv_pos: int, conv_pos_groups: int, activation_fn: str = "gelu"):
        super().__init__()
        self.pos_conv = ConvPositionalEmbedding(dim, conv_pos, conv_pos_groups)
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, ffn_dim, num_heads, dropout, attention_dropout, activation_dropout,
                             layer_norm_first, activation_fn)
            for _ in range(num_layers)
        )
        self.layers.apply(init_bert_params)
        self.layer_norm_first = layer_norm_first
        self.layerdrop = layerdrop

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                output_layer: Optional[int] = None) -> tuple[Tensor, list[Tensor]]:
        if output_layer is not None and not 1 <= output_layer <= len(self.layers):
            raise ValueError(f"output_layer must be in [1, {len(self.layers)}], got {output_layer}")
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        skip = [False] * len(self.layers)
        if self.training and self.layerdrop > 0:
            skip = (torch.rand(len(self.layers)) < self.layerdrop).tolist()  # host RNG: no device sync
        layer_results = []
        for i, layer in enumerate(self.layers):
            if not skip[i]:
                x = layer(x, padding_mask)
                layer_results.append(x)
            if output_layer is not None and i + 1 == output_layer:
                return x, layer_results
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x, layer_results
