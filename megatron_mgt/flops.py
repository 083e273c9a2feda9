"""FLOPs per token and device peak: the two halves of MFU, computed in one place.

MFU = (tokens/s * flops_per_token) / peak. FLOPs per token follow the PaLM count
(appendix B): 6 * N_matmul + 12 * L * H * d_head * T, where N_matmul is every
`nn.Linear` weight (the LM head included, the embedding lookup excluded, a tied matrix
counted once) and the second term is the attention score and value products, forward
and backward. Recomputation is not counted.

The peak is the dense rate the hardware can reach: on CUDA the datasheet bf16 figure
looked up by device name; on CPU a fp32 GEMM measured now (CPU peaks move with load,
so measure in the same run as the throughput you divide by). An unknown device gets
None, so callers report no MFU rather than a wrong one.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from megatron_mgt.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), matched in order on the lower-cased
# `torch.cuda.get_device_name()`; first match wins, so specific names come first.
CUDA_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    (r"h100.*pcie", 756e12),
    (r"h100.*nvl", 835e12),
    (r"h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"h200", 989e12),  # H200 and GH200
    (r"b200", 2250e12),
    (r"a100", 312e12),
    (r"l40s", 362e12),
    (r"\bl40\b", 181e12),
    (r"\bl4\b", 121e12),
)


def matmul_params(model: nn.Module) -> int:
    """Number of weights in every nn.Linear of `model`; a weight shared by several
    layers (tied embedding/head) counts once. Embedding lookups are not nn.Linear and
    so are not counted, except through a head that ties to them."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def flops_per_token(model_cfg: ModelConfig, n_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L H d_head T."""
    attention = 12 * model_cfg.n_layers * model_cfg.n_heads * model_cfg.head_dim * seq_len
    return float(6 * n_matmul_params + attention)


def measure_cpu_peak_flops(seconds: float = 2.0, size: int = 2048) -> float:
    """Best fp32 GEMM rate (FLOP/s) over repeated size x size matmuls for about
    `seconds`, with torch's current thread count. Interference only slows a GEMM down,
    so the best repetition is the estimate of the peak."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: thread pool, page faults
    flop = 2.0 * size**3
    best = 0.0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        t1 = time.perf_counter()
        best = max(best, flop / (t1 - t0))
        if t1 - start >= seconds:
            return best


def cuda_peak_flops_from_name(name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name, None when the device is not in the table."""
    lowered = name.lower()
    for pattern, peak in CUDA_BF16_PEAKS:
        if re.search(pattern, lowered):
            return peak
    return None


def device_peak_flops(device: str | torch.device, seconds: float = 2.0) -> float | None:
    """Peak FLOP/s for MFU: CPU -> measured fp32 GEMM rate; CUDA -> dense bf16 peak
    from the table; anything else -> None."""
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu_peak_flops(seconds)
    if device.type == "cuda":
        return cuda_peak_flops_from_name(torch.cuda.get_device_name(device))
    return None
