"""How one optimisation step runs. The trainer talks to an engine through the small
interface of `base.EngineBase` (reference: `single.SingleEngine`); distributed engines
wrap the same model from outside. Engines are imported on use, so a single-process run
never imports DeepSpeed.

Each engine also owns its checkpoint layout (`LAYOUT`, `holds`, `read_weights`,
`write_weights`); `detect_layout` and `read_weights` here are what mgt-eval, mgt-convert
and the runners call, whatever engine wrote the checkpoint."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from megatron_mgt.config import ModelConfig

ENGINES = {
    "single": "megatron_mgt.engine.single:SingleEngine",
    "deepspeed_pipe": "megatron_mgt.engine.pipeline:PipelineEngine",
    "deepspeed_zero": "megatron_mgt.engine.zero:ZeroEngine",
    "fsdp": "megatron_mgt.engine.fsdp:FSDPEngine",
}
# checkpoint layouts in detection order (a pipeline checkpoint also has ZeRO-1 optimizer files)
LAYOUT_ENGINES = {"single": "single", "pipe": "deepspeed_pipe", "dcp": "fsdp", "zero": "deepspeed_zero"}


def engine_class(name: str) -> type:
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(cfg, device):
    return engine_class(cfg.parallel.engine)(cfg, device)


def layout_class(layout: str) -> type:
    if layout not in LAYOUT_ENGINES:
        raise ValueError(f"unknown checkpoint layout {layout!r} (known: {', '.join(LAYOUT_ENGINES)})")
    return engine_class(LAYOUT_ENGINES[layout])


def detect_layout(directory: Path) -> str:
    for layout in LAYOUT_ENGINES:
        if layout_class(layout).holds(directory):
            return layout
    raise FileNotFoundError(f"{directory}: no model.pt, layer_*-model_states.pt, dcp/ or DeepSpeed ZeRO files")


def read_weights(directory: Path, cfg: ModelConfig, layout: str | None = None) -> dict[str, torch.Tensor]:
    """The single-engine state dict of the weights in checkpoint `directory`, any layout."""
    return layout_class(layout or detect_layout(directory)).read_weights(directory, cfg)


__all__ = ["ENGINES", "LAYOUT_ENGINES", "build_engine", "detect_layout", "engine_class", "layout_class", "read_weights"]
