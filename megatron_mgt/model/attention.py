"""Causal multi-head self-attention with rotary position embeddings (RoPE).

The kernel is chosen per call from what the tensors allow: flash-attn's
`flash_attn_func` when it is installed, the tensors are on CUDA in fp16/bf16 and the
config allows it; otherwise `torch.nn.functional.scaled_dot_product_attention`.
The math is the same: softmax(Q K^T / sqrt(d_head) + causal mask) V.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional GPU kernel (extra `gpu`)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


@functools.lru_cache(maxsize=8)
def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim/2] for angles t * theta^(-2i/head_dim).

    Built where they are used (each pipeline stage builds its own), cached per shape.
    Built outside inference mode even when first called inside it: a cached inference
    tensor would break every later autograd forward.
    """
    with torch.inference_mode(False):
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x1, x2) of x [B, T, H, D] by the position angle:
    (x1 cos - x2 sin, x1 sin + x2 cos), pairs taken as the two halves of D."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def flash_usable(q: torch.Tensor, kernel: str) -> bool:
    return kernel != "sdpa" and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(D), causal) v for q, k, v [B, T, H, D] -> [B, T, H, D]."""
    if kernel == "flash" and not flash_usable(q, kernel):
        raise RuntimeError("attention_kernel=flash needs flash-attn installed and CUDA fp16/bf16 tensors")
    if flash_usable(q, kernel):
        return flash_attn_func(q, k, v, causal=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """V_raw = W_o · Attn(RoPE(W_q H), RoPE(W_k H), W_v H) for the sublayer input H [B, T, d]."""

    def __init__(self, d_model: int, n_heads: int, rope_theta: float, kernel: str = "auto"):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.rope_theta, self.kernel = rope_theta, kernel
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_weights(self, std: float, out_std: float, value_gain: float = 1.0) -> None:
        """q, k ~ N(0, std); v ~ N(0, std * value_gain); out ~ N(0, out_std * value_gain)."""
        nn.init.normal_(self.qkv.weight, std=std)
        d = self.out.in_features
        with torch.no_grad():
            self.qkv.weight[2 * d :].mul_(value_gain)
        nn.init.normal_(self.out.weight, std=out_std * value_gain)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, self.head_dim).unbind(dim=2)
        cos, sin = rope_tables(t, self.head_dim, self.rope_theta, h.device)
        y = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.kernel)
        return self.out(y.reshape(b, t, d))
