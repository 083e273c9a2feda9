"""FLOPs per token and device peak: the two halves of MFU, computed in one place.

MFU = (tokens/s * flops_per_token) / peak. FLOPs per token follow the PaLM count
(appendix B): 6 * N_matmul + 12 * L * H * d_head * T, where N_matmul is every
`nn.Linear` weight (the LM head included, the embedding lookup excluded, a tied matrix
counted once) and the second term is the attention score and value products, forward
and backward. Recomputation is not counted.

The peak is the dense rate the hardware can reach: on CUDA the datasheet bf16 figure
looked up by device name; on CPU a fp32 GEMM measured now (CPU peaks move with load,
so benchmarks measure in the same run as the throughput they divide by). Training runs
divide by `remembered_cpu_peak`: the best rate any run on this machine has measured (a
run that starts while another computes measures its share, and its MFU would read up to
2x). An unknown device gets None, so callers report no MFU rather than a wrong one.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import re
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from megatron_mgt.config import ModelConfig
from megatron_mgt.fileio import write_text_atomic

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


def cpu_peak_cache() -> Path | None:
    """$XDG_CACHE_HOME/megatron_mgt/cpu_peak.json (~/.cache by default): best CPU rates measured
    here; None where there is no home directory to put it in."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no $HOME and no passwd entry (an arbitrary container uid)
            return None
    return Path(base) / "megatron_mgt" / "cpu_peak.json"


def cpu_model() -> str:
    """This machine's CPU model (/proc/cpuinfo's model name, else platform's processor or machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_key() -> str:
    """This machine's CPU, thread count and torch: what a remembered peak is valid for."""
    return f"{cpu_model()} | {os.cpu_count()} cpus | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _read_peaks(cache: Path) -> dict[str, float]:
    """The cache's entries; a damaged file or entry (not a finite positive rate) is dropped with a warning."""
    if not cache.is_file():
        return {}
    try:
        known = json.loads(cache.read_text())
        if not isinstance(known, dict):
            raise ValueError(f"top level is {type(known).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as err:
        warnings.warn(f"{cache}: unreadable CPU peak cache ({err}); starting it afresh", stacklevel=3)
        return {}
    good = {k: float(v) for k, v in known.items() if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0}
    if len(good) != len(known):
        warnings.warn(f"{cache}: dropped CPU peak entries that are not finite positive rates: {sorted(set(known) - set(good))}", stacklevel=3)
    return good


def remembered_cpu_peak(measured: float, cache: Path | None = None) -> float:
    """max(measured, the best rate remembered for this CPU key), remembering the new best.
    Interference only slows a GEMM down, so the best over runs is the estimate of the peak.
    A damaged cache is replaced (with a warning); where none can be written the remembered
    best is still read if it can be, and this run's measurement is used otherwise."""
    cache = cache or cpu_peak_cache()
    if cache is None:
        warnings.warn("no home directory for the CPU peak cache (set XDG_CACHE_HOME); MFU uses this run's measurement", stacklevel=2)
        return measured
    key = _cpu_key()
    best = measured
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.with_name(cache.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            known = _read_peaks(cache)
            best = max(measured, known.get(key, 0.0))
            if best > known.get(key, 0.0):
                write_text_atomic(cache, json.dumps({**known, key: best}, indent=1))
    except OSError as err:
        try:
            best = max(best, _read_peaks(cache).get(key, 0.0))  # read-only cache: still use what it knows
        except OSError:
            pass
        warnings.warn(f"{cache}: CPU peak cache not writable ({err}); MFU uses the best known rate without storing this one", stacklevel=2)
    return best


def cuda_peak_flops_from_name(name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name, None when the device is not in the table."""
    lowered = name.lower()
    for pattern, peak in CUDA_BF16_PEAKS:
        if re.search(pattern, lowered):
            return peak
    return None


def device_peak_flops(device: str | torch.device, seconds: float = 2.0, remember: bool = False) -> float | None:
    """Peak FLOP/s for MFU: CPU -> measured fp32 GEMM rate (with `remember`: the best this
    machine has measured, `remembered_cpu_peak`); CUDA -> dense bf16 peak from the table;
    anything else -> None."""
    device = torch.device(device)
    if device.type == "cpu":
        measured = measure_cpu_peak_flops(seconds)
        return remembered_cpu_peak(measured) if remember else measured
    if device.type == "cuda":
        return cuda_peak_flops_from_name(torch.cuda.get_device_name(device))
    return None
