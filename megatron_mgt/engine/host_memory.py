"""Host (CPU) memory allocation for training on the CPU: glibc malloc tuned once per process.

By default glibc hands the top of its heap back to the kernel whenever more than the trim
threshold is free there, and adapts its mmap threshold as blocks come and go. A training
step frees and re-allocates the same few-MB activations every step, so some pages are
returned and faulted in again (zero-filled) on the next step, more for MGT with its larger
saved set. `keep` (train.cpu_malloc, the default) fixes the mmap threshold at 32 MiB (glibc's
maximum: larger tensors, e.g. the logits, still get their own mapping), keeps up to 1 GiB
free at the heap top and grows it in 64 MiB steps; `default` leaves glibc alone. Measured at
the benchmark shape (12 layers, d 256, 8 x 256): minor page faults per step fall from about
107k to 60k (mgt) and 64k to 30k (preln); paired per-step tokens/s keep / default, two runs
of `bench/bench_fused.py --variants preln,preln+keep,mgt,mgt+keep --steps 20`: mgt 1.047
[1.010, 1.085] and 1.049 [1.000, 1.099], preln 0.988 [0.942, 1.036] and 1.069 [1.029, 1.111]
(docs/BENCHMARKS.md "CPU malloc"); peak RSS +1-2%. Results never change.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}

_applied: str | None = None


def tune_cpu_malloc(mode: str) -> str:
    """Apply train.cpu_malloc once per process: 'keep' -> the KEEP mallopt settings, 'default'
    -> leave glibc alone (what holds then stays 'default' for the process). Returns what holds now: 'keep', 'default', or 'unavailable (...)'
    where the C library has no mallopt (not glibc). A later call with another mode does not
    undo the first (glibc cannot be reset), it reports what holds."""
    global _applied
    if mode not in ("keep", "default"):
        raise ValueError(f"train.cpu_malloc must be 'keep' or 'default', got {mode!r}")
    if _applied is not None or mode == "default":
        _applied = _applied or "default"
        return _applied
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError) as err:
        _applied = f"unavailable ({err})"
        return _applied
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    failed = [param for param, value in KEEP.items() if mallopt(param, value) != 1]
    _applied = "keep" if not failed else f"unavailable (mallopt refused {failed})"
    return _applied
