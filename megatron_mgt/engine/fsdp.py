"""FSDP2: `fully_shard` on every block, then on the root (embedding, final norm, head).

Parameters, gradients and optimizer state are sharded over all ranks (ZeRO-3-like; with
`parallel.fsdp_reshard_after_forward=false` parameters stay gathered between forward and
backward, ZeRO-2-like). On CUDA with bf16 the MixedPrecisionPolicy computes in bf16 and
reduces gradients in fp32; on CPU everything is fp32.

Initialisation equals the single engine's without any rank ever holding the whole model:
every rank builds the model on the meta device, shards it, and allocates only its shards
(`to_empty`); rank 0 replays the single engine's init one layer at a time on the CPU
(engine/replay.py, as the pipeline and ZeRO-3 do) and `set_model_state_dict(layer, ...,
broadcast_from_rank0=True)` sends each layer's shards out (at the 200-layer preset rank 0's
host holds a block, 0.27 GB, the embedding, 0.26 GB, and at the end the head, 0.26 GB,
instead of the model's 54 GB). Every rank's global RNG is seeded alike.

Gradients: by default the micro-batches accumulate unsharded gradients and reduce-scatter once
per step (the least communication); `parallel.fsdp_reduce_every_micro_batch=true`
reduce-scatters after every micro-batch and accumulates the shards (1/world of the gradient
memory, one reduce-scatter per micro-batch). Checkpoints are DCP (torch.distributed.checkpoint) sharded directories:
CKPT/dcp/ (model + optimizer, one file per rank + metadata) and CKPT/scheduler.pt.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from megatron_mgt.config import Config, ModelConfig
from megatron_mgt.engine.base import Batch, EngineBase, Gate, StepResult, checkpoint_step
from megatron_mgt.engine.dist import all_mean, all_sum, dp_slice, init_distributed, shutdown, use_bf16, weighted_mean
from megatron_mgt.engine.optim import build_optimizer, finish_step, set_schedule_step
from megatron_mgt.engine.replay import holds_own_tensors, model_layer, replay_order, replayed_layers
from megatron_mgt.engine.single import checkpoint_blocks, compile_blocks
from megatron_mgt.model import Transformer, lm_loss

DCP_DIR = "dcp"
SCHEDULER = "scheduler.pt"


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient norm over all shards (pre-clip), then clip with it; as torchtitan
    does: the per-shard norms are DTensors whose full_tensor() is the global norm."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def materialise_from_rank0(model: Transformer, seed: int, rank: int) -> None:
    """Fill a sharded, allocated (to_empty) model with the single engine's initialisation:
    rank 0 replays it layer by layer (`replayed_layers`) and broadcasts each layer's full
    state, every rank keeping its shards. Every rank walks the layers in the same order (each
    broadcast is collective)."""
    cfg = model.cfg
    torch.manual_seed(seed)  # the replay forks the RNG: every rank leaves with the same state
    replayed = replayed_layers(cfg, seed) if rank == 0 else None
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    try:
        for layer in replay_order(cfg):
            state = next(replayed)[1] if replayed is not None else {}
            if holds_own_tensors(cfg, layer):  # the same on every rank: each broadcast is collective
                set_model_state_dict(model_layer(model, layer), state, options=options)
    finally:
        if replayed is not None:
            replayed.close()


class FSDPEngine(EngineBase):
    LAYOUT = "dcp"

    def __init__(self, cfg: Config, device: torch.device | None = None):
        self.cfg = cfg
        env, self.device = init_distributed(cfg)
        self.rank, self.world_size = env.rank, env.world_size
        self.dp_rank, self.dp_size = env.rank, env.world_size
        mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        self.bf16 = use_bf16(cfg, self.device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else MixedPrecisionPolicy()
        with torch.device("meta"):
            model = Transformer(cfg.model)
        compile_blocks(model, cfg.model)  # before fully_shard
        checkpoint_blocks(model, cfg.parallel.activation_checkpoint_interval)
        reshard = cfg.parallel.fsdp_reshard_after_forward
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        model.to_empty(device=self.device)
        materialise_from_rank0(model, cfg.train.seed, self.rank)
        self.model = model
        self.optimizer, self.scheduler = build_optimizer(model, cfg.train)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list[Batch], gate: Gate | None = None) -> StepResult:
        self.model.train()
        total = torch.zeros((), device=self.device)
        n = len(micro_batches)
        for i, (inputs, targets) in enumerate(micro_batches):
            # reduce-scatter once per step (unsharded grads accumulate), or after every micro-batch
            self.model.set_requires_gradient_sync(self.cfg.parallel.fsdp_reduce_every_micro_batch or i == n - 1)
            loss = lm_loss(self.model(inputs.to(self.device)), targets.to(self.device)) / n
            loss.backward()
            total += loss.detach()
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm([p for p in self.model.parameters() if p.requires_grad], clip)
        return finish_step(self, all_mean(total).item(), grad_norm.item(), gate, reduce=all_sum)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Loss of the global batch; each rank runs its slice (all ranks join every forward)."""
        self.model.eval()
        inputs, targets = dp_slice(inputs, targets, self.dp_rank, self.dp_size)
        logits = self.model(inputs.to(self.device))  # even with no rows: every rank joins the all-gathers
        loss = lm_loss(logits, targets.to(self.device)) if targets.numel() else torch.zeros((), device=self.device)
        return weighted_mean(loss, targets.numel())

    def save(self, directory: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / DCP_DIR))
        if self.is_main:
            torch.save(self.scheduler.state_dict(), directory / SCHEDULER)

    def load(self, directory: Path) -> None:
        """A DCP dir with model and optimizer (an engine checkpoint), or with the model
        only (made by mgt-convert): then the optimizer starts fresh and the schedule is
        set to the checkpoint's step."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        reader = dcp.FileSystemReader(str(directory / DCP_DIR))
        has_optim = any(k.startswith("optim.") for k in reader.read_metadata().state_dict_metadata)
        state = {"model": model_state, "optim": optim_state} if has_optim else {"model": model_state}
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        if has_optim:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(self.model, state["model"])
            # a fresh optimizer over the parameters as they are now (loading may swap them)
            self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg.train)
            set_schedule_step(self.scheduler, checkpoint_step(directory))
        if (directory / SCHEDULER).is_file():
            self.scheduler.load_state_dict(torch.load(directory / SCHEDULER, weights_only=True))
        dist.barrier()

    def close(self) -> None:
        shutdown()

    @staticmethod
    def holds(directory: Path) -> bool:
        return (directory / DCP_DIR / ".metadata").is_file()

    @staticmethod
    def read_weights(directory: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """The 'model' entries of the DCP directory, gathered into one state dict (no process group)."""
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory(prefix="mgt_dcp_") as tmp:
            dcp_to_torch_save(directory / DCP_DIR, Path(tmp) / "full.pt")
            full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
        return dict(full["model"])

    @classmethod
    def write_weights(cls, state: dict[str, torch.Tensor], directory: Path, cfg: ModelConfig) -> None:
        dcp.save({"model": state}, checkpoint_id=str(directory / DCP_DIR), no_dist=True)
