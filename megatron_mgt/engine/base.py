"""The interface the trainer sees. Every engine provides:

    model                     the (local part of the) model, for inspection only
    device                    this rank's device
    lr                        current learning rate
    train_step(micro_batches, gate=None) -> StepResult
                              gate(loss, grad_norm) -> bool may withhold the step; an engine
                              whose optimizer step DeepSpeed owns refuses a gate (ConfigError)
    eval_loss(inputs, targets) -> global mean loss per token of one batch (every rank passes
                              the same batch)
    save(dir) / load(dir)     every rank writes/reads its own files in the same dir
    rank, world_size          global process rank and count
    dp_rank, dp_size          data-parallel coordinates: the loader's rank/world_size
    is_main                   global rank 0: logs, metrics, checkpoint rename + pointer
    geometry_snapshot(probe, center, spectrum) -> geometry.geometry_snapshot of the whole model on every
                              rank (the pipeline assembles it from what each stage measured)
    barrier(), any_rank(flag), close()

and, as class attributes that need no process group, its checkpoint layout:

    LAYOUT                    the layout's name (single, pipe, dcp, zero)
    holds(dir) -> bool        whether a checkpoint dir is in this layout
    read_weights(dir, model_cfg) -> the single-engine state dict of the weights
    write_weights(state, dir, model_cfg)  the weights alone in this layout (mgt-convert)

The defaults here are those of one process; distributed engines override them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_mgt.config import ConfigError, ModelConfig
from megatron_mgt.engine import dist
from megatron_mgt.geometry import LAYER_METRICS, geometry_snapshot, layer_metrics, sublayer_geometry
from megatron_mgt.model.transformer import capture_geometry

TRAINER_STATE = "trainer.pt"  # the trainer's part of every checkpoint (megatron_mgt.checkpoint writes it)
Batch = tuple[torch.Tensor, torch.Tensor]
Gate = Callable[[float, float], bool]  # (loss, grad_norm) -> apply this step?


@dataclass(frozen=True)
class StepResult:
    """What one optimisation step reports: the global mean loss, the pre-clip gradient
    norm over all ranks and stages, whether the optimizer stepped, and |theta_new - theta_old|
    (None when not measured or not applied)."""

    loss: float
    grad_norm: float
    applied: bool
    update_norm: float | None = None


def checkpoint_step(directory: Path) -> int:
    """The step recorded in a checkpoint's trainer.pt (0 when there is none): where a
    weights-only load sets the schedule."""
    path = directory / TRAINER_STATE
    return int(torch.load(path, weights_only=False)["step"]) if path.is_file() else 0


class EngineBase:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    device: torch.device
    LAYOUT: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def refuse_gate(self, gate: Gate | None) -> None:
        """Engines whose optimizer step happens inside DeepSpeed cannot withhold it."""
        if gate is not None:
            raise ConfigError(f"{type(self).__name__} cannot withhold an optimizer step: use stability.response=rollback or record")

    def geometry_snapshot(self, probe: torch.Tensor, center: bool, spectrum: str = "svd") -> dict:
        """One forward pass of `self.model` (the whole Transformer) in eval mode; under
        FSDP / ZeRO every rank must call it (parameters are gathered collectively). With
        several ranks the per-layer metrics (an SVD per layer, the cost at depth) are split:
        rank r measures layers l = r mod world_size and all_gather_object assembles them, so
        the record equals the one-process geometry_snapshot at 1/world_size of its cost."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.world_size == 1:
                return geometry_snapshot(self.model, probe, center, spectrum)
            captured = capture_geometry(self.model, probe)
        finally:
            self.model.train(was_training)
        hidden = captured["hidden"]
        mine = {i: layer_metrics(hidden[i], center, spectrum) for i in range(self.rank, len(hidden), self.world_size)}
        rows = {i: row for part in dist.gather_objects(mine) for i, row in part.items()}
        snap = {key: [rows[i][key] for i in range(len(hidden))] for key in LAYER_METRICS}
        return {**snap, "centered": center, "sublayers": sublayer_geometry(captured["sublayers"])}

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        return dist.any_rank(flag, self.device)

    def close(self) -> None:
        """Leave the process group (distributed engines); nothing for one process."""

    @staticmethod
    def holds(directory: Path) -> bool:
        raise NotImplementedError

    @staticmethod
    def read_weights(directory: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def write_weights(cls, state: dict[str, torch.Tensor], directory: Path, cfg: ModelConfig) -> None:
        raise ValueError(f"layout {cls.LAYOUT!r} is a source only: convert to single, pipe or dcp")
