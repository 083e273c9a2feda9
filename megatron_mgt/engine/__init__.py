"""How one optimisation step runs. The trainer talks to an engine through the small
interface of `base.EngineBase` (reference: `single.SingleEngine`); distributed engines
wrap the same model from outside. Engines are imported on use, so a single-process run
never imports DeepSpeed."""

from __future__ import annotations

import importlib

from megatron_mgt.engine.single import SingleEngine

ENGINES = {
    "single": "megatron_mgt.engine.single:SingleEngine",
    "deepspeed_pipe": "megatron_mgt.engine.pipeline:PipelineEngine",
    "deepspeed_zero": "megatron_mgt.engine.zero:ZeroEngine",
    "fsdp": "megatron_mgt.engine.fsdp:FSDPEngine",
}


def engine_class(name: str) -> type:
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(cfg, device):
    return engine_class(cfg.parallel.engine)(cfg, device)


__all__ = ["ENGINES", "SingleEngine", "build_engine", "engine_class"]
