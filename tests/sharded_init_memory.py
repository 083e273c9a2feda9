"""Run by tests/test_engines.py under torchrun (2 processes, gloo): the host memory a rank
gains while ZeRO-3 (`partitioned_model`) and FSDP (`FSDPEngine`) build and initialise the
model, against the same rank building the whole `Transformer`. Writes $PROBE_OUT/rank{N}.json. Run it with
MALLOC_MMAP_THRESHOLD_ set low: glibc then maps each large tensor on its own and unmaps it
when freed, so resident memory is the live memory, not the heap holes that the full-size
tensors zero.Init allocates and partitions leave behind (those are reused, never live at
once: without the setting rank 0 shows about 0.55 MB per MB of its shard on top of it)."""

from __future__ import annotations

import gc
import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mgt.config import load_config
from megatron_mgt.engine.ds_common import deepspeed_config, import_deepspeed
from megatron_mgt.engine.fsdp import FSDPEngine
from megatron_mgt.engine.zero import partitioned_model
from megatron_mgt.model import Transformer

OVERRIDES = [
    "model.residual=mgt", "model.n_layers=48", "model.d_model=512", "model.n_heads=8", "model.vocab_size=256", "train.device=cpu",
    "parallel.engine=deepspeed_zero", "parallel.zero_stage=3", "parallel.deepspeed_config=configs/deepspeed/zero3.json", "train.micro_batch_size=1",
]  # fmt: skip


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read())[1])


def gained_kib(build) -> tuple[object, int]:
    """(build(), peak resident memory during it minus resident memory before), in KiB."""
    gc.collect()  # what an earlier build left in reference cycles is freed now, not during this one
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = rss_kib("VmRSS")
    out = build()
    return out, rss_kib("VmHWM") - before


def main() -> None:
    cfg = load_config(None, OVERRIDES)
    dist.init_process_group("gloo")
    deepspeed = import_deepspeed(torch.device("cpu"))
    deepspeed.init_distributed(dist_backend="gloo")
    config = deepspeed_config(cfg, dist.get_world_size(), False)
    model, partitioned = gained_kib(lambda: partitioned_model(deepspeed, cfg, config, dist.get_rank()))
    full_bytes = 4 * sum(p.ds_numel for p in model.parameters())
    shard_bytes = 4 * sum(p.ds_tensor.numel() for p in model.parameters())
    block_bytes = 4 * sum(p.ds_numel for p in model.layers["0"].parameters())
    del model
    fsdp_cfg = load_config(None, [*OVERRIDES, "parallel.engine=fsdp", "parallel.zero_stage=0", "parallel.deepspeed_config="])
    fsdp, fsdp_kib = gained_kib(lambda: FSDPEngine(fsdp_cfg))
    del fsdp
    _, whole = gained_kib(lambda: Transformer(cfg.model))
    # bf16: zero.Init makes parameters bf16; the fixed alpha buffer must stay fp32 and exact on every rank
    small = load_config(None, [*OVERRIDES, "model.n_layers=2", "model.final_norm=false", "model.mgt.alpha_mode=fixed", "train.precision=bf16"])
    bf16_model = partitioned_model(deepspeed, small, deepspeed_config(small, dist.get_world_size(), True), dist.get_rank())
    alphas = [b for name, b in bf16_model.named_buffers() if name.endswith("alpha")]
    report = {"rank": dist.get_rank(), "partitioned_kib": partitioned, "fsdp_kib": fsdp_kib, "whole_kib": whole, "full_bytes": full_bytes, "shard_bytes": shard_bytes, "block_bytes": block_bytes}
    report.update(param_dtypes=sorted({str(p.dtype) for p in bf16_model.parameters()}), alpha_dtypes=sorted({str(b.dtype) for b in alphas}), alpha_values=sorted({b.item() for b in alphas}))
    Path(os.environ["PROBE_OUT"], f"rank{dist.get_rank()}.json").write_text(json.dumps(report))  # not stdout: the ranks' lines interleave
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
