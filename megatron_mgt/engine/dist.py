"""Process-group plumbing shared by the distributed engines.

Launchers (torchrun, deepspeed, srun via slurm/) export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; without them a run is one process and gets a private
localhost rendezvous (DeepSpeed otherwise falls into an MPI lookup).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mgt.config import Config, ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK from the launcher; a lone process becomes rank 0 of 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` for one rank: auto/cuda -> the CUDA device LOCAL_RANK % device_count
    (sites that bind one GPU per task show each task a single device) when CUDA is there,
    else cpu; any other name (cpu, cuda:1, ...) as given."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if name == "cuda":
        raise ConfigError("train.device=cuda but CUDA is not available")
    return torch.device("cpu" if name == "auto" else name)


def resolve_backend(cfg: Config, device: torch.device) -> str:
    backend = cfg.parallel.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    return backend


def dist_timeout(cfg: Config) -> datetime.timedelta:
    """`parallel.dist_timeout_minutes` as the collectives' timeout."""
    return datetime.timedelta(minutes=cfg.parallel.dist_timeout_minutes)


def init_distributed(cfg: Config) -> tuple[DistEnv, torch.device]:
    """Join (or create) the default process group; returns this rank's env and device."""
    env = launcher_env()
    device = resolve_device(cfg.train.device, env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(resolve_backend(cfg, device), rank=env.rank, world_size=env.world_size, timeout=dist_timeout(cfg))
    return env, device


def bf16_enabled(precision: str, device_type: str) -> bool:
    """The one precision rule: bf16 when `train.precision` is bf16, or auto on CUDA; else fp32."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def use_bf16(cfg: Config, device: torch.device) -> bool:
    return bf16_enabled(cfg.train.precision, device.type)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where `bf16_enabled`, else nothing (fp32)."""
    if bf16_enabled(precision, device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_mean(value: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of a scalar tensor over a group (a copy; the argument is left alone)."""
    out = value.detach().clone().float()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, group=group)
        out /= dist.get_world_size(group)
    return out


def all_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of a tensor over a group (a copy)."""
    out = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, group=group)
    return out


def all_max(value: float, device: torch.device) -> float:
    """The largest `value` over all ranks (every rank must call it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any (so all ranks stop at the same step)."""
    return bool(all_max(1.0 if flag else 0.0, device))


def gather_objects(obj) -> list:
    """all_gather_object over the default group: every rank's `obj`, in rank order ([obj] alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def dp_slice(inputs: torch.Tensor, targets: torch.Tensor, dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This data-parallel rank's rows of a global evaluation batch."""
    return inputs.tensor_split(dp_size)[dp_rank], targets.tensor_split(dp_size)[dp_rank]


def weighted_mean(loss: torch.Tensor, count: int, group=None) -> float:
    """Global mean of per-rank mean losses weighted by their token counts."""
    t = torch.stack([loss.detach().float() * count, torch.tensor(float(count), device=loss.device)])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return (t[0] / t[1]).item()
