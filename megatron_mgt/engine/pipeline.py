"""DeepSpeed pipeline parallelism (1F1B) with ZeRO stage 1 over the data-parallel replicas.

The model becomes a list of DeepSpeed layer specs, in the order of `Transformer.forward`:

    [embedding, block 0, ..., block L-1, final norm, head]

With tied embeddings the embedding is a `TiedLayerSpec('embed', ...)` that the head uses
again through `tied_head` (logits = x W_E^T); DeepSpeed keeps a copy on the first and last
stage and all-reduces its gradient between them. The causal mask and the RoPE tables are
built inside every block's attention where it runs (cached per shape), so stages send only
the hidden states [B, T, d]. Stages are cut by `parallel.partition_method`: `balanced`
(engine/partition.py: blocks, head and embedding priced by training FLOPs), or DeepSpeed's
`parameters` / `uniform`. `parallel.activation_checkpoint_interval` recomputes every N layers
(blocks only). Micro-batches per step = train.grad_accum_steps, run by `train_batch`.

Initialisation equals the single engine's for the same seed without building the whole
model at once: `engine/replay.py` re-runs the construction order of `Transformer.__init__`
on the CPU generator one module at a time, and the stage keeps its layers' tensors.

Checkpoints are DeepSpeed's: CKPT/layer_NN-model_states.pt per layer (NN = index in the
list above; the tied head has no file of its own), mp_rank_*_model_states.pt and
*_optim_states.pt. `mgt-convert` turns them into model.pt and back.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mgt.config import Config, ConfigError, ModelConfig
from megatron_mgt.engine.base import Batch, EngineBase, Gate, StepResult, checkpoint_step
from megatron_mgt.engine.dist import dist_timeout, dp_slice, gather_objects, init_distributed, resolve_backend, shutdown, use_bf16
from megatron_mgt.engine.ds_common import deepspeed_config, ds_load, ds_save, import_deepspeed, update_norm
from megatron_mgt.engine.optim import build_optimizer, set_schedule_step
from megatron_mgt.engine.partition import layer_costs, partition_balanced
from megatron_mgt.engine.replay import replay_init
from megatron_mgt.geometry import LAYER_METRICS, layer_metrics, sublayer_geometry
from megatron_mgt.model import lm_loss
from megatron_mgt.model.block import Block
from megatron_mgt.model.norm import norm_class
from megatron_mgt.model.residual import rule_type

TIED_KEY = "embed"
_LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt$")


def tied_head(embedding: nn.Embedding, x: torch.Tensor) -> torch.Tensor:
    """The LM head of a tied model: the embedding matrix used as the output projection."""
    return F.linear(x, embedding.weight)


def _stream_hook(cfg: ModelConfig, name: str):
    """The residual rule's `expand` / `collapse` of the residual stream (multi-stream rules
    widen it after the embedding and narrow it before the final norm, as
    `Transformer.forward` does), or None for rules without one."""
    return getattr(rule_type(cfg), name, None)


class PipeEmbedding(nn.Embedding):
    """The embedding stage: lookup, then the rule's stream expansion (identity for most)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.vocab_size, cfg.d_model)
        self.model_cfg = cfg
        self.expand = _stream_hook(cfg, "expand")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = super().forward(tokens)
        return self.expand(x, self.model_cfg) if self.expand is not None else x


class _FinalNormStage:
    """The final-norm stage: the rule's stream collapse, then the model's final norm. Mixed
    into the norm class itself (the layer file holds its 'weight', 'bias' as model.pt's
    'norm.*'); built with make_norm's arguments, so it is the module Transformer.norm is."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, eps=cfg.norm_eps)
        self.model_cfg = cfg
        self.collapse = _stream_hook(cfg, "collapse")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.collapse(x, self.model_cfg) if self.collapse is not None else x)


class PipeFinalNorm(_FinalNormStage, nn.LayerNorm):
    """The final-norm stage with model.norm=layernorm."""


class PipeFinalRMSNorm(_FinalNormStage, nn.RMSNorm):
    """The final-norm stage with model.norm=rmsnorm."""


def final_norm_stage(cfg: ModelConfig) -> type[nn.Module]:
    """The final-norm stage class of `norm_class(cfg)`."""
    return {nn.LayerNorm: PipeFinalNorm, nn.RMSNorm: PipeFinalRMSNorm}[norm_class(cfg)]


def layer_specs(cfg: ModelConfig) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if cfg.tie_embeddings:
        embed = TiedLayerSpec(TIED_KEY, PipeEmbedding, cfg, tied_weight_attr=["weight"])
        head = TiedLayerSpec(TIED_KEY, PipeEmbedding, cfg, forward_fn=tied_head, tied_weight_attr=["weight"])
    else:
        embed = LayerSpec(PipeEmbedding, cfg)
        head = LayerSpec(nn.Linear, cfg.d_model, cfg.vocab_size, bias=False)
    blocks = [LayerSpec(Block, cfg) for _ in range(cfg.n_layers)]
    return [embed, *blocks, LayerSpec(final_norm_stage(cfg), cfg), head]


def pipe_prefix(cfg: ModelConfig, layer: int) -> str:
    """The single-engine (model.pt) name prefix of pipeline layer `layer`'s parameters."""
    if layer == 0:
        return "embed."
    if layer <= cfg.n_layers:
        return f"layers.{layer - 1}."
    return "norm." if layer == cfg.n_layers + 1 else "head."


def pipe_layer_file(directory: Path, layer: int) -> Path:
    """DeepSpeed's name for a pipeline layer file (PipelineModule.ckpt_layer_path)."""
    return directory / f"layer_{layer:02d}-model_states.pt"


def _file_layers(cfg: ModelConfig) -> range:
    """Pipeline layers that have a file: the tied head has none of its own."""
    return range(cfg.n_layers + 2 if cfg.tie_embeddings else cfg.n_layers + 3)


def pipeline_module_class(parts: list[int] | None):
    """PipelineModule that cuts at `parts` (our balanced partition) instead of its own."""
    from deepspeed.pipe import PipelineModule

    class MGTPipelineModule(PipelineModule):
        def _partition_layers(self, method="uniform"):
            if parts is None:
                return super()._partition_layers(method)
            self.parts = list(parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return MGTPipelineModule


def local_layers(module) -> dict[int, nn.Module]:
    """Pipeline layer index -> module held by this stage (the tied embedding appears at
    index 0 and/or L+2; `tied_head` entries are functions over the same module)."""
    out = {}
    for offset, func in enumerate(module.forward_funcs):
        idx = module._local_start + offset
        target = func.args[0] if hasattr(func, "func") else func
        if isinstance(target, nn.Module):
            out[idx] = target
    return out


class PipelineEngine(EngineBase):
    LAYOUT = "pipe"

    def __init__(self, cfg: Config, device: torch.device | None = None):
        self.cfg = cfg
        env, self.device = init_distributed(cfg)
        self.rank, self.world_size = env.rank, env.world_size
        stages = cfg.parallel.pipeline_stages
        if self.world_size % stages:
            raise ConfigError(f"parallel.pipeline_stages={stages} does not divide the {self.world_size} processes")
        n_items = cfg.model.n_layers + 3
        if stages > n_items:
            raise ConfigError(f"parallel.pipeline_stages={stages} exceeds the {n_items} pipeline layers")
        deepspeed = import_deepspeed(self.device)
        deepspeed.init_distributed(dist_backend=resolve_backend(cfg, self.device), timeout=dist_timeout(cfg))
        p = cfg.parallel
        parts = (
            partition_balanced(layer_costs(cfg.model, cfg.data.seq_len, p.embed_cost), stages) if p.partition_method == "balanced" else None
        )
        module_class = pipeline_module_class(parts)
        module = module_class(
            layers=layer_specs(cfg.model),
            num_stages=stages,
            loss_fn=lm_loss,
            partition_method=p.partition_method,
            activation_checkpoint_interval=p.activation_checkpoint_interval,
            checkpointable_layers=[Block.__name__],
            base_seed=cfg.train.seed,
        )
        self.parts = list(module.parts)
        layers = local_layers(module)
        init = replay_init(cfg.model, cfg.train.seed, set(layers))
        with torch.no_grad():
            for idx, layer in layers.items():
                if idx == cfg.model.n_layers + 2 and cfg.model.tie_embeddings and 0 in layers:
                    continue  # the same tied module as layer 0
                layer.load_state_dict(init[idx])
        module.to(self.device)
        self.stage_id = module.stage_id
        self.num_stages = stages
        self.dp_size = self.world_size // stages
        self.dp_rank = module._grid.data_parallel_id
        optimizer, scheduler = build_optimizer(module, cfg.train)
        config = deepspeed_config(cfg, self.dp_size, use_bf16(cfg, self.device))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.model = module

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_step(self, micro_batches: list[Batch], gate: Gate | None = None) -> StepResult:
        """1F1B over the micro-batches; the loss comes from the last stage, averaged over
        data-parallel replicas and broadcast to every stage; the grad norm is DeepSpeed's
        (summed over stages, tied copies counted once), before clipping."""
        self.refuse_gate(gate)
        second_copy = self._second_tied_copy()
        before = second_copy.detach().clone() if second_copy is not None else None
        loss = self.engine.train_batch(data_iter=iter(micro_batches))
        norm = self.engine.get_global_grad_norm()
        twice = (second_copy.detach() - before).pow(2).sum() if before is not None else None
        return StepResult(
            loss=float(loss),
            grad_norm=float(norm) if norm is not None else float("nan"),
            applied=self.engine.was_step_applied(),
            update_norm=update_norm(self.cfg, self.engine, self.device, counted_twice=twice),
        )

    def _second_tied_copy(self) -> torch.Tensor | None:
        """The tied embedding weight on the last stage of replica 0 (the first stage holds the
        other copy), so the update norm counts it once; None elsewhere or when untracked."""
        st = self.cfg.stability
        if not (st.enabled and st.update_norm and self.cfg.model.tie_embeddings and self.num_stages > 1):
            return None
        if self.stage_id != self.num_stages - 1 or self.dp_rank != 0:
            return None
        return self.model.tied_modules[TIED_KEY].weight

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One micro-batch through the pipeline (this replica's slice of the global batch);
        averaged over replicas by DeepSpeed."""
        odd = inputs.size(0) != self.cfg.train.micro_batch_size * self.dp_size
        return self._eval_micro_batch(dp_slice(inputs, targets, self.dp_rank, self.dp_size), odd)

    def _eval_micro_batch(self, batch: Batch, odd_shape: bool) -> float:
        """`eval_batch` of one micro-batch. A batch of another shape than the training
        micro-batch is sent with its shape, then the cached receive buffers are dropped so
        training allocates its own again."""
        e = self.engine
        if odd_shape:
            e.dynamic_shape = True
        try:
            return float(e.eval_batch(iter([batch]), num_micro_batches=1))
        finally:
            if odd_shape:
                e.dynamic_shape = False
                e.first_output_send, e.pipe_recv_buf, e.grad_layer = True, None, None

    @torch.no_grad()
    def geometry_snapshot(self, probe: torch.Tensor, center: bool, spectrum: str = "svd") -> dict:
        """The probe through the pipeline (every replica sends it whole); each stage records
        the stream after its embedding / blocks (forward hooks) and what its residual rules
        capture; the stage's data-parallel replicas split its layers between them, and
        all_gather_object assembles the parts in depth order: the same record
        geometry.geometry_snapshot gives for the whole model."""
        layers = {idx: m for idx, m in local_layers(self.model).items() if idx <= self.cfg.model.n_layers}  # embedding, blocks
        hidden: dict[int, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda _m, _in, out, idx=idx: hidden.__setitem__(idx, out.detach())) for idx, m in layers.items()]
        blocks = {idx: m for idx, m in layers.items() if isinstance(m, Block)}
        rules = [(f"layers.{idx - 1}.{part}", getattr(b, f"{part}_residual")) for idx, b in blocks.items() for part in ("attn", "mlp")]
        for _, rule in rules:
            rule.capture = True
        was_training = self.model.training
        try:
            self._eval_micro_batch((probe, torch.zeros_like(probe)), odd_shape=True)
            captured = {name: dict(rule.captured) for name, rule in rules}
        finally:
            for hook in hooks:
                hook.remove()
            for _, rule in rules:
                rule.capture, rule.captured = False, {}
            self.model.train(was_training)
        order = sorted(hidden)
        # the stage's replicas split its layers: replica r measures every dp_size-th one
        mine = {"layers": {idx: layer_metrics(hidden[idx], center, spectrum) for idx in order[self.dp_rank :: self.dp_size]}}
        mine["sublayers"] = sublayer_geometry(captured) if self.dp_rank == 0 else {}
        layer_rows, sublayers = {}, {}
        for part in gather_objects(mine):
            layer_rows.update(part["layers"])
            sublayers.update(part["sublayers"])
        depth = sorted(layer_rows)
        snap = {key: [layer_rows[i][key] for i in depth] for key in LAYER_METRICS}
        snap["centered"] = center
        snap["sublayers"] = dict(sorted(sublayers.items(), key=lambda kv: (int(kv[0].split(".")[1]), kv[0].endswith("mlp"))))
        return snap

    def save(self, directory: Path) -> None:
        ds_save(self.engine, directory)

    def load(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint, or weights only (layer files from mgt-convert): then
        this stage reads its layers, AdamW starts fresh and the schedule is set to the step."""
        if any(directory.glob("*optim_states.pt")):
            ds_load(self.engine, directory)
            return
        with torch.no_grad():
            for idx, layer in local_layers(self.model).items():
                path = pipe_layer_file(directory, idx if idx <= self.cfg.model.n_layers + 1 or not self.cfg.model.tie_embeddings else 0)
                layer.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        if hasattr(self.engine.optimizer, "refresh_fp32_params"):
            self.engine.optimizer.refresh_fp32_params()  # ZeRO-1 keeps its own fp32 copy of the weights
        set_schedule_step(self.scheduler, checkpoint_step(directory))
        self.barrier()

    def close(self) -> None:
        shutdown()

    @staticmethod
    def holds(directory: Path) -> bool:
        return any(_LAYER_FILE.search(p.name) for p in directory.glob("layer_*-model_states.pt"))

    @staticmethod
    def read_weights(directory: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for layer in _file_layers(cfg):
            path = pipe_layer_file(directory, layer)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing pipeline layer file (model has {cfg.n_layers} blocks, tie_embeddings={cfg.tie_embeddings})")
            prefix = pipe_prefix(cfg, layer)
            for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
                state[prefix + key] = value
        if cfg.tie_embeddings:
            state["head.weight"] = state["embed.weight"]
        return state

    @classmethod
    def write_weights(cls, state: dict[str, torch.Tensor], directory: Path, cfg: ModelConfig) -> None:
        for layer in _file_layers(cfg):
            prefix = pipe_prefix(cfg, layer)
            torch.save({k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}, pipe_layer_file(directory, layer))
