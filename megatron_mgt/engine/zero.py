"""DeepSpeed ZeRO-1/2/3 data parallelism without a pipeline.

The model gets the single engine's initialisation for the same seed and is handed to
`deepspeed.initialize` with a torch AdamW and the warmup-cosine LambdaLR, so no DeepSpeed op
is JIT-compiled. ZeRO-2 shards gradients and optimizer state and builds the full model on
every rank. ZeRO-3 also shards the parameters, and never holds the whole model: it is built
under `deepspeed.zero.Init` (each rank allocates its partition of a parameter as the module
that owns it is constructed), then rank 0 replays the initialisation one layer at a time on
the CPU (engine/replay.py) and scatters each layer (`GatheredParameters`, modifier rank 0),
so a rank's peak is its shard plus the layer being written (and, on rank 0, the replay's
copy of it), not the model (54 GB of fp32 weights for the 200-layer preset). Checkpoints: DeepSpeed's own files in the step dir (mp_rank_00_model_states.pt,
*_optim_states.pt per rank); `mgt-convert` consolidates them into model.pt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_mgt.config import Config, ModelConfig
from megatron_mgt.engine.base import Batch, EngineBase, Gate, StepResult
from megatron_mgt.engine.dist import all_mean, dist_timeout, dp_slice, init_distributed, resolve_backend, shutdown, use_bf16, weighted_mean
from megatron_mgt.engine.ds_common import deepspeed_config, ds_load, ds_save, import_deepspeed, update_norm
from megatron_mgt.engine.optim import build_optimizer
from megatron_mgt.engine.replay import holds_own_tensors, model_layer, replay_order, replayed_layers
from megatron_mgt.engine.single import checkpoint_blocks, compile_blocks
from megatron_mgt.model import Transformer, lm_loss


def partitioned_model(deepspeed, cfg: Config, config: dict, rank: int) -> Transformer:
    """ZeRO-3: Transformer(cfg.model) with each parameter partitioned over the ranks from the
    moment it exists, then filled with the single engine's initialisation (`replayed_layers`
    on rank 0, one layer gathered, written and re-partitioned at a time). Every rank walks
    the layers in the same order: each gather is collective. zero.Init creates every floating
    tensor in the compute dtype, buffers too; buffers are not partitioned and stay fp32 as
    on the unpartitioned path (alpha_mode=fixed: 0.1, not bf16's 0.10009765625), written
    on rank 0 and then broadcast."""
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = Transformer(cfg.model)
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    for b in buffers:
        b.data = b.data.float()
    replayed = replayed_layers(cfg.model, cfg.train.seed) if rank == 0 else None
    try:
        for layer in replay_order(cfg.model):
            state = next(replayed)[1] if replayed is not None else None
            if not holds_own_tensors(cfg.model, layer):
                continue
            module = model_layer(model, layer)
            with torch.no_grad(), deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                if state is not None:
                    module.load_state_dict(state)
    finally:
        if replayed is not None:
            replayed.close()  # restores the caller's RNG state now, also after an error
    for b in buffers:
        torch.distributed.broadcast(b.data, src=0)
    return model


class ZeroEngine(EngineBase):
    LAYOUT = "zero"

    def __init__(self, cfg: Config, device: torch.device | None = None):
        self.cfg = cfg
        env, self.device = init_distributed(cfg)
        self.rank, self.world_size = env.rank, env.world_size
        self.dp_rank, self.dp_size = env.rank, env.world_size
        deepspeed = import_deepspeed(self.device)
        deepspeed.init_distributed(dist_backend=resolve_backend(cfg, self.device), timeout=dist_timeout(cfg))
        config = deepspeed_config(cfg, self.dp_size, use_bf16(cfg, self.device))
        torch.manual_seed(cfg.train.seed)
        if cfg.parallel.zero_stage == 3:
            model = partitioned_model(deepspeed, cfg, config, self.rank)
        else:
            model = Transformer(cfg.model).to(self.device)
        compile_blocks(model, cfg.model)  # before deepspeed.initialize
        checkpoint_blocks(model, cfg.parallel.activation_checkpoint_interval)
        optimizer, scheduler = build_optimizer(model, cfg.train)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.model = self.engine.module

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_step(self, micro_batches: list[Batch], gate: Gate | None = None) -> StepResult:
        """DeepSpeed scales each micro-batch loss by 1/accumulation, averages gradients over
        ranks, clips by the global norm and steps at the last micro-batch."""
        self.refuse_gate(gate)
        self.engine.train()
        total = torch.zeros((), device=self.device)
        for inputs, targets in micro_batches:
            loss = lm_loss(self.engine(inputs.to(self.device)), targets.to(self.device))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        norm = self.engine.get_global_grad_norm()
        return StepResult(
            loss=all_mean(total / len(micro_batches)).item(),
            grad_norm=float(norm) if norm is not None else float("nan"),
            applied=self.engine.was_step_applied(),
            update_norm=update_norm(self.cfg, self.engine, self.device),
        )

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        self.engine.eval()
        inputs, targets = dp_slice(inputs, targets, self.dp_rank, self.dp_size)
        logits = self.engine(inputs.to(self.device))  # ZeRO-3: every rank joins the gathers
        loss = lm_loss(logits, targets.to(self.device)) if targets.numel() else torch.zeros((), device=self.device)
        return weighted_mean(loss, targets.numel())

    def save(self, directory: Path) -> None:
        ds_save(self.engine, directory)

    def load(self, directory: Path) -> None:
        ds_load(self.engine, directory)

    def close(self) -> None:
        shutdown()

    @staticmethod
    def holds(directory: Path) -> bool:
        return any(directory.glob("*optim_states.pt"))

    @staticmethod
    def read_weights(directory: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """fp32 weights consolidated from the ZeRO partitions by DeepSpeed's zero_to_fp32."""
        import os

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name))
