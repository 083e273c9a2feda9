"""Causal multi-head self-attention with rotary position embeddings (RoPE).

The kernel is chosen per call from what the tensors allow: flash-attn's
`flash_attn_func` when it is installed, the tensors are on CUDA in fp16/bf16 and the
config allows it; otherwise `torch.nn.functional.scaled_dot_product_attention`.
The math is the same: softmax(Q K^T / sqrt(d_head) + causal mask) V.

Generation passes a `KVCache`: the keys and values of the positions already seen, so a new
token attends to them without recomputing them (SDPA, new positions offset by the cache
length). Training never builds one and runs the code path above unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional GPU kernel (extra `gpu`)
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


def rope_angles(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim/2] for angles t * theta^(-2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


@functools.lru_cache(maxsize=8)
def _cached_rope_angles(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):
        return rope_angles(seq_len, head_dim, theta, device)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_angles`, built where they are used (each pipeline stage builds its own) and cached
    per shape in eager mode. Built outside inference mode even when first called inside it: a
    cached inference tensor would break every later autograd forward. Inside torch.compile the
    tables are part of the traced graph (dynamo would ignore the cache anyway)."""
    if torch.compiler.is_compiling():
        return rope_angles(seq_len, head_dim, theta, device)
    return _cached_rope_angles(seq_len, head_dim, theta, device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x1, x2) of x [B, T, H, D] by the position angle:
    (x1 cos - x2 sin, x1 sin + x2 cos), pairs taken as the two halves of D."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


FLASH_MAX_HEAD_DIM = 256  # flash-attn 2: head_dim <= 256 and a multiple of 8


def flash_refusal(q: torch.Tensor, kernel: str) -> str:
    """Why flash-attn cannot run on q [B, T, H, D] ("" when it can)."""
    head_dim = q.shape[-1]
    if kernel == "sdpa":
        return "model.attention_kernel=sdpa"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (flash-attn needs fp16/bf16)"
    if head_dim > FLASH_MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim {head_dim} (flash-attn needs <= {FLASH_MAX_HEAD_DIM} and a multiple of 8)"
    if flash_attn_func is None:
        return "flash-attn not installed"
    if not q.is_cuda:
        return f"tensors on {q.device.type}"
    return ""


def flash_usable(q: torch.Tensor, kernel: str) -> bool:
    return not flash_refusal(q, kernel)


def kernel_description(head_dim: int, kernel: str, device: torch.device, dtype: torch.dtype, n_heads: int = 1) -> str:
    """Which kernel `causal_attention` runs on [B, T, n_heads, head_dim] tensors of `dtype` on
    `device`: "flash-attn X.Y" or "SDPA <backend> (<why not flash-attn>)", the backend as
    torch's dispatcher picks it (flash_attention, efficient_attention, cudnn_attention, math)."""
    q = torch.zeros(1, 16, n_heads, head_dim, device=device, dtype=dtype)
    reason = flash_refusal(q, kernel)
    if not reason:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"flash-attn {version('flash-attn')}"
        except PackageNotFoundError:
            return "flash-attn"
    t = q.transpose(1, 2)
    try:
        from torch.nn.attention import SDPBackend

        backend = SDPBackend(torch._fused_sdp_choice(t, t, t, None, 0.0, True)).name.lower()
    except (AttributeError, RuntimeError, TypeError, ValueError) as err:  # a private torch API
        backend = f"backend unknown: {type(err).__name__}"
    return f"SDPA {backend} ({reason})"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(D), causal) v for q, k, v [B, T, H, D] -> [B, T, H, D]; flash-attn
    where `flash_usable` (auto), else SDPA."""
    if kernel == "flash" and (reason := flash_refusal(q, kernel)):
        raise RuntimeError(f"model.attention_kernel=flash but flash-attn cannot run: {reason}")
    if flash_usable(q, kernel):
        return flash_attn_func(q, k, v, causal=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


@dataclass
class KVCache:
    """Keys and values [B, T_past, H, D] (after RoPE) of one attention layer, for generation."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' k, v [B, T_new, H, D]; return all of them."""
        self.k = k if self.k is None else torch.cat((self.k, k), dim=1)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=1)
        return self.k, self.v


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for the T_new last positions q [B, T_new, H, D]
    against all positions k, v [B, T_all, H, D]: new position i sees j <= T_all - T_new + i."""
    t_new, t_all = q.shape[1], k.shape[1]
    mask = torch.ones(t_new, t_all, dtype=torch.bool, device=q.device).tril(t_all - t_new)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
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

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """h [B, T, d] -> [B, T, d]; with `cache`, h holds the positions after the cached ones."""
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, self.head_dim).unbind(dim=2)
        if cache is None:
            cos, sin = rope_tables(t, self.head_dim, self.rope_theta, h.device)
            y = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.kernel)
        else:
            past = cache.length
            cos, sin = (table[past:] for table in rope_tables(past + t, self.head_dim, self.rope_theta, h.device))
            y = cached_attention(apply_rope(q, cos, sin), *cache.extend(apply_rope(k, cos, sin), v))
        return self.out(y.reshape(b, t, d))
