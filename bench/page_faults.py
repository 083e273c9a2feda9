"""Minor page faults per training step (getrusage ru_minflt) of bench_model's models in one
process, with glibc malloc as train.cpu_malloc sets it (engine/host_memory.py): the
figures of docs/BENCHMARKS.md "CPU malloc". Steps 3-5 are reported (1-2 warm up).

    python bench/page_faults.py default preln,mgt
    python bench/page_faults.py keep preln,mgt
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_model import Candidate, build  # noqa: E402

from megatron_mgt.config import ModelConfig  # noqa: E402
from megatron_mgt.engine.host_memory import tune_cpu_malloc  # noqa: E402


def main(mode: str, variants: str) -> None:
    print("cpu_malloc:", tune_cpu_malloc(mode))
    torch.set_num_threads(2)
    shape = ModelConfig(vocab_size=8000, d_model=256, n_layers=12, n_heads=4, max_seq_len=256)
    cands = [Candidate(v, *build(v, shape), shape, 256) for v in variants.split(",")]
    data = torch.randint(0, 8000, (8, 257), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    for rep in range(5):
        for cand in cands:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = cand.step(x, y)
            if rep >= 2:
                print(f"{cand.name}: {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before} minor faults, {seconds:.2f} s")


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) >= 3 else ("default", "preln,mgt")))
