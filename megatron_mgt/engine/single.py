"""One process, one device: the reference engine every other engine must match."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

from megatron_mgt.config import Config, TrainConfig
from megatron_mgt.engine.base import EngineBase
from megatron_mgt.model import Transformer, lm_loss

Batch = tuple[torch.Tensor, torch.Tensor]


def lr_factor(step: int, train: TrainConfig) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine down to `min_lr_ratio` at `max_steps`."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2), none on norms, biases and alpha."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=(train.beta1, train.beta2), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, train))
    return opt, sched


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a fresh warmup-cosine schedule at `step` (after loading weights without optimizer state)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def checkpoint_step(directory: Path) -> int:
    """The step recorded in a checkpoint's trainer.pt (0 when there is none)."""
    path = directory / "trainer.pt"
    return int(torch.load(path, weights_only=False)["step"]) if path.is_file() else 0


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (precision auto or bf16), fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SingleEngine(EngineBase):
    """Model + AdamW + warmup-cosine schedule on one device."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(device)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.train)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """Accumulate gradients over the micro-batches, clip, step. Returns the mean loss
        and the pre-clip gradient norm; the step is skipped (no update) when either is
        not finite, so the caller can stop with the weights still good."""
        self.model.train()
        total = torch.zeros((), device=self.device)
        for inputs, targets in micro_batches:
            with autocast_for(self.device, self.cfg.train.precision):
                loss = lm_loss(self.model(inputs.to(self.device)), targets.to(self.device)) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        loss_value, norm_value = total.item(), grad_norm.item()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": norm_value}

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        self.model.eval()
        with autocast_for(self.device, self.cfg.train.precision):
            return lm_loss(self.model(inputs.to(self.device)), targets.to(self.device)).item()

    def save(self, directory: Path) -> None:
        torch.save(self.model.state_dict(), directory / "model.pt")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        """model.pt and optimizer.pt; a weights-only checkpoint (mgt-convert) starts fresh
        AdamW moments with the schedule set to the checkpoint's step."""
        self.model.load_state_dict(torch.load(directory / "model.pt", map_location=self.device, weights_only=True))
        if not (directory / "optimizer.pt").is_file():
            set_schedule_step(self.scheduler, checkpoint_step(directory))
            return
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
