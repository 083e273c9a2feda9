"""The optimizer every engine uses: AdamW with decoupled weight decay on matrices, the
warmup-cosine schedule, and the exact norm of the update a step applied (read from AdamW's
state, no copy of the weights). Engines that own their torch optimizer (single, FSDP) end a
step with `finish_step`; the DeepSpeed engines hand the same optimizer and schedule to
`deepspeed.initialize`."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_mgt.config import TrainConfig
from megatron_mgt.engine.base import Gate, StepResult


def lr_factor(step: int, train: TrainConfig) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine down to `min_lr_ratio` at `max_steps`."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2), none on norms, biases and alpha. A ZeRO-3
    partitioned parameter is a flat shard: its own shape is `ds_shape`."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
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


UPDATE_NORM_CHUNK = 1 << 24  # elements per temporary while measuring the update (bounds its memory)


def inner_adamw(optimizer) -> torch.optim.AdamW:
    """The torch AdamW under DeepSpeed's ZeRO wrappers (`.optimizer`), or `optimizer` itself."""
    while not isinstance(optimizer, torch.optim.AdamW):
        optimizer = optimizer.optimizer
    return optimizer


def scheduled_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[float]:
    """The learning rates the last optimizer step used (the scheduler has moved on since)."""
    return [base * fn(scheduler.last_epoch - 1) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]


@torch.no_grad()
def adamw_update_sq_norm(optimizer: torch.optim.AdamW, lrs: list[float], params: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
    """|theta_new - theta_old|^2 of the AdamW step just taken, over the parameters this rank
    holds, from its state (no copy of the weights). torch's AdamW does
    theta <- theta (1 - c) - s m / (sqrt(v / bc2) + eps) with c = lr wd, s = lr / bc1, so
    theta_new - theta_old = -(c theta_new + s m / (sqrt(v / bc2) + eps)) / (1 - c).
    Sharded states (FSDP DTensors, ZeRO partitions) give this rank's share: sum over ranks.
    Computed with foreach kernels, UPDATE_NORM_CHUNK elements of temporaries at a time.
    `params[i]` replaces group i's parameter list (ZeRO-3 empties it between steps)."""
    total = None
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, lrs, strict=True)):
        beta1, beta2 = group["betas"]
        c = lr * group["weight_decay"]
        by_step: dict[float, list[tuple[torch.Tensor, ...]]] = {}
        for p in group["params"] if params is None else params[i]:
            state = optimizer.state.get(p, {})
            if "exp_avg" in state:
                local = [t.to_local() if hasattr(t, "to_local") else t for t in (p.detach(), state["exp_avg"], state["exp_avg_sq"])]
                by_step.setdefault(float(state["step"]), []).extend(
                    zip(*(t.reshape(-1).split(UPDATE_NORM_CHUNK) for t in local), strict=True)
                )
        for step, triples in by_step.items():
            bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            for batch in _batches_of(triples, UPDATE_NORM_CHUNK):
                thetas, ms, vs = (list(t) for t in zip(*batch, strict=True))
                denom = torch._foreach_sqrt(vs)
                torch._foreach_div_(denom, math.sqrt(bc2))
                torch._foreach_add_(denom, group["eps"])
                update = torch._foreach_div(ms, denom)
                del denom
                torch._foreach_mul_(update, lr / bc1)
                if c:
                    torch._foreach_add_(update, thetas, alpha=c)
                sq = torch.stack(torch._foreach_norm(update)).double().pow(2).sum() / (1 - c) ** 2
                total = sq if total is None else total + sq
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def _batches_of(triples: list[tuple[torch.Tensor, ...]], max_elements: int):
    """Consecutive runs of triples holding at most about `max_elements` elements each."""
    batch, size = [], 0
    for triple in triples:
        batch.append(triple)
        size += triple[0].numel()
        if size >= max_elements:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def finish_step(engine, loss: float, grad_norm: float, gate: Gate | None, reduce=lambda t: t) -> StepResult:
    """The end of a step for engines that own their torch optimizer (single, FSDP): step
    unless a value is non-finite or the gate refuses, measure the update
    (`stability.update_norm`; `reduce` sums a rank's share over ranks), clear gradients."""
    applied = math.isfinite(loss) and math.isfinite(grad_norm) and (gate is None or gate(loss, grad_norm))
    update_norm = None
    if applied:
        engine.optimizer.step()
        engine.scheduler.step()
        if engine.cfg.stability.enabled and engine.cfg.stability.update_norm:
            sq = adamw_update_sq_norm(engine.optimizer, scheduled_lrs(engine.scheduler))
            update_norm = math.sqrt(float(reduce(sq.to(engine.device))))
    engine.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, grad_norm=grad_norm, applied=applied, update_norm=update_norm)


