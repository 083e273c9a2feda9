"""One process, one device: the reference engine every other engine must match.

Checkpoint layout `single`: CKPT/model.pt (the Transformer's state dict, what every other
layout converts to) and CKPT/optimizer.pt (AdamW + schedule; absent in a converted,
weights-only checkpoint)."""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.utils.checkpoint

from megatron_mgt.config import Config, ModelConfig
from megatron_mgt.engine.base import Batch, EngineBase, Gate, StepResult, checkpoint_step
from megatron_mgt.engine.dist import autocast
from megatron_mgt.engine.optim import build_optimizer, finish_step, set_schedule_step
from megatron_mgt.model import Transformer, lm_loss

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"


def compile_blocks(model: Transformer, cfg: ModelConfig) -> None:
    """`model.compile`: torch.compile every block of `model.layers` in place (`Block.compile()`,
    parameter names unchanged). Every engine calls it right after building the model, in the
    order build -> compile blocks -> activation checkpointing -> parallel wrapping (fully_shard)."""
    if cfg.compile:
        for block in model.layers.values():
            block.compile()


def checkpoint_blocks(model: Transformer, interval: int) -> None:
    """`parallel.activation_checkpoint_interval=1` for the engines without a pipeline: every
    block keeps only its input for backward and recomputes its forward there
    (torch.utils.checkpoint, non-reentrant), in place: parameter names and state dicts are
    unchanged. Applied after `compile_blocks` (a compiled block traces the checkpointed
    forward) and before parallel wrapping, whose hooks gather the weights for the recompute
    as for the forward. (The pipeline checkpoints groups of `interval` blocks itself.)"""
    if not interval:
        return
    for block in model.layers.values():
        block.forward = types.MethodType(_checkpointed_forward, block)  # bound: a deepcopy runs its own block


def _checkpointed_forward(block: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The block's own forward under non-reentrant activation checkpointing."""
    return torch.utils.checkpoint.checkpoint(type(block).forward, block, x, *args, use_reentrant=False, **kwargs)


class SingleEngine(EngineBase):
    """Model + AdamW + warmup-cosine schedule on one device."""

    LAYOUT = "single"

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(device)
        compile_blocks(self.model, cfg.model)
        checkpoint_blocks(self.model, cfg.parallel.activation_checkpoint_interval)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.train)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list[Batch], gate: Gate | None = None) -> StepResult:
        """Accumulate gradients over the micro-batches, clip, step. The step is withheld
        (no update, schedule unmoved) when loss or norm is not finite, or when
        `gate(loss, grad_norm)` says no."""
        self.model.train()
        total = torch.zeros((), device=self.device)
        for inputs, targets in micro_batches:
            with autocast(self.cfg.train.precision, self.device):
                loss = lm_loss(self.model(inputs.to(self.device)), targets.to(self.device)) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        return finish_step(self, total.item(), grad_norm.item(), gate)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        self.model.eval()
        with autocast(self.cfg.train.precision, self.device):
            return lm_loss(self.model(inputs.to(self.device)), targets.to(self.device)).item()

    def save(self, directory: Path) -> None:
        torch.save(self.model.state_dict(), directory / MODEL_FILE)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        """model.pt and optimizer.pt; a weights-only checkpoint (mgt-convert) starts fresh
        AdamW moments with the schedule set to the checkpoint's step."""
        self.model.load_state_dict(torch.load(directory / MODEL_FILE, map_location=self.device, weights_only=True))
        if not (directory / OPTIMIZER_FILE).is_file():
            set_schedule_step(self.scheduler, checkpoint_step(directory))
            return
        state = torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @staticmethod
    def holds(directory: Path) -> bool:
        return (directory / MODEL_FILE).is_file()

    @staticmethod
    def read_weights(directory: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)

    @classmethod
    def write_weights(cls, state: dict[str, torch.Tensor], directory: Path, cfg: ModelConfig) -> None:
        torch.save(state, directory / MODEL_FILE)
