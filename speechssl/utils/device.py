"""Device helpers: host reads that do not stall a GPU, and matmuls in full fp32.

* :class:`HostCopy`: a small device tensor's values on the host. On CUDA, ``.tolist()`` / ``.item()`` /
  boolean-mask indexing wait until the device has run everything queued so far (a host-device sync: the
  device then idles while the host queues the next kernels). A :class:`HostCopy` queues the copy (pinned
  memory, ``non_blocking``) and records an event when it is made; :meth:`HostCopy.get` waits on that event
  only, i.e. for the kernels queued before the copy. The models read their masked-frame counts this way
  once the Transformer is queued: the host waits for the masking kernels, never for the encoder. On the
  CPU it is a plain read.
* :func:`count_host_reads`: counts, on any device (the CPU included, where they cost nothing), the
  operations that would make the host wait for a GPU; the tests use it to keep the training step free of
  them, ``tools/gpu_check.sh`` on CUDA uses ``torch.cuda.set_sync_debug_mode`` instead.
* :func:`ieee_fp32` and :func:`fp32_matmul`: matrix products in full IEEE fp32 even when TF32 is allowed
  (``torch.backends.cuda.matmul.allow_tf32``, which the trainer turns on for fp32 training on CUDA). TF32
  keeps 10 mantissa bits: a cosine similarity off by ~1e-3 becomes a logit off by ~1e-2 after the
  1 / logit_temp = 10 scaling of the contrastive and HuBERT losses. :func:`fp32_matmul` keeps TF32 off in
  the backward pass too (autograd runs backward after the forward's context has closed).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


class HostCopy:
    """``tensor``'s values on the host, copied without a device-wide sync (see the module docstring).

    ``HostCopy(t)`` starts the copy; ``get()`` returns ``t.tolist()`` (waiting for the copy on first use).
    """

    def __init__(self, tensor: Tensor):
        tensor = tensor.detach()
        self._event = None
        if tensor.device.type == "cuda":
            # a pinned destination (the caching host allocator's): the copy is asynchronous
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.cpu()
        self._values = None

    def get(self) -> list:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()  # waits for the copy (and what precedes it), not for later work
            self._values = self._host.tolist()
        return self._values


# ops whose output shape depends on tensor values: on CUDA they copy a count to the host and wait for it
_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "repeat_interleave"}


class _HostReadMode(TorchDispatchMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":  # .item(), bool(), int(), float(), 0-d tensor indices
            self.counts["item"] += 1
        elif name in _DATA_DEPENDENT or (name in ("index", "index_put", "index_put_") and any(
                isinstance(i, Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)):
            self.counts["boolean_mask" if name.startswith("index") else name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads() -> Iterator[collections.Counter]:
    """Count, inside the block, what would make the host wait for a GPU (a ``Counter`` by kind):

    * ``item``: a tensor value read as a Python number (``.item()``, ``bool()``, ``int()``, ``float()``,
      indexing with a 0-d tensor);
    * ``boolean_mask``, ``nonzero``, ``masked_select``, ``_unique2``...: ops whose output shape depends on
      the data (``x[mask]``);
    * ``tolist``: ``Tensor.tolist()``;
    * ``tensor_to_device``: ``torch.tensor`` / ``torch.as_tensor`` of host data with a ``device``
      (a blocking copy when that device is a GPU);
    * ``host_copy``: :meth:`HostCopy.get` first reads (on CUDA they wait for the copy only; counted apart,
      and the ``tolist`` inside is not counted).

    On the CPU every tensor is on the host, so host-only reads count too: keep them out of the measured
    code. Not thread-safe (patches ``torch.tensor``, ``torch.as_tensor``, ``Tensor.tolist`` for the block).
    """
    counts: collections.Counter = collections.Counter()
    paused = [False]
    tensor, as_tensor, tolist, get = torch.tensor, torch.as_tensor, Tensor.tolist, HostCopy.get

    def counted_tensor(data, *args, **kwargs):
        if kwargs.get("device") is not None and not paused[0]:
            counts["tensor_to_device"] += 1
        return tensor(data, *args, **kwargs)

    def counted_as_tensor(data, *args, **kwargs):
        if kwargs.get("device") is not None and not isinstance(data, Tensor) and not paused[0]:
            counts["tensor_to_device"] += 1
        return as_tensor(data, *args, **kwargs)

    def counted_tolist(self):
        if not paused[0]:
            counts["tolist"] += 1
        return tolist(self)

    def counted_get(self):
        if self._values is not None:
            return self._values
        counts["host_copy"] += 1
        paused[0] = True
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                return get(self)
        finally:
            paused[0] = False

    torch.tensor, torch.as_tensor, Tensor.tolist, HostCopy.get = (counted_tensor, counted_as_tensor,
                                                                 counted_tolist, counted_get)
    try:
        with _HostReadMode(counts):
            yield counts
    finally:
        torch.tensor, torch.as_tensor, Tensor.tolist, HostCopy.get = tensor, as_tensor, tolist, get


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Inside: CUDA fp32 matmuls in IEEE fp32 (TF32 off), whatever the global setting; restored on exit."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class _IEEEMatmul(torch.autograd.Function):
    """``a @ b`` for ``(..., n, k) x (..., k, m)`` with equal batch dims; forward and backward in IEEE fp32."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        with ieee_fp32():
            return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        ga = gb = None
        with ieee_fp32():
            if ctx.needs_input_grad[0]:
                ga = torch.matmul(grad, b.transpose(-2, -1))
            if ctx.needs_input_grad[1]:
                gb = torch.matmul(a.transpose(-2, -1), grad)
        return ga, gb


def fp32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (``mm`` or ``bmm`` shapes: 2-D, or 3-D with the same batch size) in IEEE fp32 forward and
    backward, never TF32. Inputs are used as given (pass fp32; call outside autocast)."""
    if a.dim() != b.dim() or a.dim() not in (2, 3) or (a.dim() == 3 and a.shape[0] != b.shape[0]):
        raise ValueError(f"fp32_matmul takes (n, k) x (k, m) or (B, n, k) x (B, k, m), got {tuple(a.shape)} "
                         f"x {tuple(b.shape)}")
    return _IEEEMatmul.apply(a, b)
