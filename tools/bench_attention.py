#!/usr/bin/env python
"""Self-attention with a learned additive bias (data2vec 2.0's ALiBi with learned scales) on CPU:
speechssl's :class:`~speechssl.models.components.SelfAttention` against torch's
``F.scaled_dot_product_attention`` given the same bias, forward + backward, in the same process.

With a bias that needs a gradient, SDPA takes its math path on CPU, which upcasts bf16 to fp32, matmuls
included; speechssl computes softmax(QK^T / sqrt(d) + bias) V explicitly in the input dtype there (the
outputs agree: tests/test_wav2vec2_components.py). Prints milliseconds per step and the ratio.

    python tools/bench_attention.py                   # the data2vec 2.0 tiny shapes, bf16 and fp32
    python tools/bench_attention.py --batch 8 --frames 500 --dim 768 --heads 12 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from speechssl.models.components import SelfAttention


def step_ms(fn, x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, repeats: int) -> float:
    for i in range(repeats + 3):
        if i == 3:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(x, scale)
        out.float().sum().backward()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--frames", type=int, default=250)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attn = SelfAttention(args.dim, args.heads).train()
    x = torch.randn(args.batch, args.frames, args.dim, requires_grad=True)
    pos = torch.arange(args.frames)
    distance = (pos[:, None] - pos[None, :]).abs().float()
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / args.heads) for h in range(args.heads)])
    scale = torch.ones(args.heads, requires_grad=True)

    shape = {"shared": (1, -1, -1, -1), "per-utterance": (args.batch, -1, -1, -1)}
    current = ["shared"]

    def bias(s: torch.Tensor) -> torch.Tensor:
        # (1, H, L, L): every utterance's frames at positions 0..L-1 (fine-tuning, the teacher);
        # (B, H, L, L): the student's kept frames, whose positions differ per utterance
        return (-(slopes * s)[:, None, None] * distance)[None].expand(*shape[current[0]])

    def ours(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return attn(x, None, bias(s))

    def sdpa(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = attn.qkv_proj(x).view(B, L, 3, args.heads, D // args.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias(s).to(q.dtype))
        return attn.out_proj(out.transpose(1, 2).reshape(B, L, D))

    print(f"torch {torch.__version__}, {args.threads} thread(s); batch {args.batch} x {args.frames} frames, "
          f"dim {args.dim}, {args.heads} heads; bias with learned per-head scales; forward + backward")
    for kind in shape:
        current[0] = kind
        for dtype in (torch.bfloat16, torch.float32):
            with torch.no_grad():
                torch.testing.assert_close(ours(x, scale).float(), sdpa(x, scale).float(), atol=0.05, rtol=0.05)
            ref = step_ms(sdpa, x, scale, dtype, args.repeats)
            mine = step_ms(ours, x, scale, dtype, args.repeats)
            name = str(dtype).replace("torch.", "")
            print(f"{kind:13s} bias, {name:8s}  torch SDPA {ref:8.2f} ms   speechssl {mine:8.2f} ms   "
                  f"ratio {ref / mine:5.2f}x")


if __name__ == "__main__":
    main()
