"""Will a preset fit a cluster? Per pipeline stage: parameters, memory, and the bubble.

    mgt-plan PRESET.yaml [section.key=value ...] [--nodes 2 --gpus-per-node 8 --pp 8 ...]

Nothing here needs a GPU. Parameters are counted exactly by building the model on the
`meta` device (shapes, no storage); activation memory is measured the same way, from the
tensors autograd saves for backward during one meta forward of a block (and of the
head + loss), so a change to the model changes the plan without a formula to update.
With a fused attention kernel (flash-attn, SDPA's flash / memory-efficient backends) the
meta forward runs attention through `_FusedAttention`, which saves what those kernels keep
for backward (q, k, v, out and the fp32 log-sum-exp [B, H, T]) instead of the [B, H, T, T]
softmax of the math path: the attention matrix is identified by the op, never by shape.

Memory model per GPU of stage s (p stages, m micro-batches, dp data-parallel replicas):

- weights      n_s * 2 B (bf16) or 4 B (fp32)
- gradients    n_s * 4 B fp32 accumulation buffer (DeepSpeed's BF16_Optimizer under
               data_types.grad_accum_dtype=fp32), + n_s * 2 B bf16 .grad with bf16 weights
- optimizer    n_s * 12 B / dp: AdamW fp32 master copy + m + v, ZeRO-1 sharded over dp
- activations  1F1B keeps min(p - s, m) micro-batches in flight on stage s (stage 0: p).
               Without activation checkpointing each holds every block's saved tensors;
               with it (every k blocks), each holds the input of every k-th block, plus
               k blocks' full sets while they are recomputed.
- reserve      CUDA context, NCCL buffers, allocator fragmentation (default 4 GB)

When a stage does not fit, the plan names it and the activation checkpointing interval k
whose fullest stage is smallest, k = argmin_k max_s [in_flight_s ceil(n_s / k) input + k block]
(the recompute is one extra forward of every block whatever k is). A training checkpoint
holds every weight in the model dtype (the tied matrix once) + the fp32 master, m and v
(12 B per parameter, sharded over dp, written in full); its write time is its size over an
aggregate file-system bandwidth (--ckpt-write-gbps).

With tied embeddings, the first and the last stage each hold a copy of the tied matrix
(DeepSpeed's TiedLayerSpec); the total parameter count counts it once.

The data-parallel sharded engines (`parallel.engine` fsdp or deepspeed_zero; one "stage",
no pipeline) keep other states per GPU (`state_layout`): ZeRO-2 shards the gradients too,
ZeRO-3 the bf16 weights as well and keeps gathered two blocks (the running and the
prefetched one) plus what `stage3_max_reuse_distance` keeps (parameters reused within that
many, 1e9 by default: the whole of a model under 1e9 parameters); the gradient partitions
of ZeRO-2/3 are fp32 (4 B / dp), their bf16 buckets are left to the reserve; FSDP2 keeps fp32 weight shards (its own master copy) with AdamW's m and v
(8 B), gathers two blocks in the compute dtype (every block with
`fsdp_reshard_after_forward=false`; the root's embedding, norm and head stay gathered too,
left to the reserve), and its gradients are sharded fp32 unless several
micro-batches accumulate unsharded (fp32, every parameter: the default
`fsdp_reduce_every_micro_batch=false`). They checkpoint single blocks (interval 1) or none.
Other engines are planned as the pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import asdict, dataclass, field, replace
from unittest import mock

import torch
from torch import nn

from megatron_mgt.config import Config, ConfigError, load_config
from megatron_mgt.engine.dist import bf16_enabled
from megatron_mgt.engine.ds_common import deepspeed_config
from megatron_mgt.engine.partition import layer_costs, partition_balanced
from megatron_mgt.flops import matmul_params
from megatron_mgt.model import Transformer, attention, lm_loss

GB = 1e9
ADAM_STATE_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq
GRAD_ACCUM_BYTES = 4  # fp32 accumulation buffer
ZERO3_REUSE_DISTANCE = 1e9  # DeepSpeed's default stage3_max_reuse_distance (parameters)


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    pipeline_stages: int = 1
    data_parallel: int = 0  # 0: every GPU not used by the pipeline
    micro_batches: int = 0  # 0: train.grad_accum_steps
    micro_batch_size: int = 0  # 0: train.micro_batch_size
    activation_checkpoint_interval: int = 0  # 0: off; k: keep every k-th block input, recompute k blocks
    flash_attention: bool = True  # no T x T attention matrix kept (flash-attn / fused SDPA)
    reserve_gb: float = 4.0
    ckpt_write_gbps: float = 2.0  # aggregate file-system write bandwidth, GB/s

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class StateLayout:
    """Bytes per parameter of each training state on a GPU, and which are sharded over the
    data-parallel ranks; `gathered_blocks` blocks are held whole, in the compute dtype."""

    engine: str
    weight_bytes: int
    weights_sharded: bool
    grad_bytes: int
    grads_sharded: bool
    optimizer_bytes: int  # always sharded over dp (ZeRO-1 and up, FSDP)
    gathered_blocks: int


def state_layout(cfg: Config, bf16: bool, micro_batches: int) -> StateLayout:
    """Where each state lives for `parallel.engine` (the module docstring's memory model)."""
    par, wbytes = cfg.parallel, 2 if bf16 else 4
    grad = GRAD_ACCUM_BYTES + (wbytes if bf16 else 0)  # fp32 accumulation + the bf16 .grad
    if par.engine == "fsdp":
        sharded_grads = par.fsdp_reduce_every_micro_batch or micro_batches == 1
        gathered = 2 if par.fsdp_reshard_after_forward else cfg.model.n_layers
        return StateLayout("fsdp (FSDP2)", 4, True, 4, sharded_grads, ADAM_STATE_BYTES - 4, gathered)
    if par.engine == "deepspeed_zero":  # stage >= 2: one fp32 gradient partition (grad_accum_dtype fp32); the bf16 buckets are in the reserve
        stage = par.zero_stage
        return StateLayout(f"deepspeed_zero (ZeRO-{stage})", wbytes, stage == 3, GRAD_ACCUM_BYTES if stage >= 2 else grad, stage >= 2, ADAM_STATE_BYTES, 2 if stage == 3 else 0)
    return StateLayout("pipeline (ZeRO-1)", wbytes, False, grad, False, ADAM_STATE_BYTES, 0)


@dataclass
class Stage:
    index: int
    items: list[str]  # "embed", "layers.0", ..., "head"
    params: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    in_flight: int
    activations_gb: float
    total_gb: float
    fits: bool


@dataclass
class Plan:
    preset: str
    total_params: int
    matmul_params: int
    n_layers: int
    cluster: Cluster
    dp: int
    micro_batches: int
    micro_batch_size: int
    seq_len: int
    param_dtype: str
    tokens_per_step: int
    bubble: float
    partition: str
    layer_activation_mb: float  # one block, one micro-batch, every saved tensor
    layer_input_mb: float  # what a checkpointed block keeps
    head_activation_mb: float = 0.0  # head + loss, one micro-batch
    layout: StateLayout | None = None  # bytes per parameter of each state on a GPU (state_layout)
    checkpoint_gb: float = 0.0  # one training checkpoint, all ranks together
    checkpoint_write_s: float = 0.0  # at cluster.ckpt_write_gbps
    over: list[int] = field(default_factory=list)  # stages above the GPU memory
    advice_interval: int = 0  # when a stage is over: the checkpointing interval with the smallest fullest stage
    advice_total_gb: float = 0.0  # that fullest stage
    stages: list[Stage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the plan assumed that the preset asked otherwise

    @property
    def fits(self) -> bool:
        return not self.problems and all(s.fits for s in self.stages)


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """Idle share of a plain 1F1B (or GPipe) schedule: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def split_items(cfg: Config, counts: list[int], parts: int) -> tuple[list[int], str]:
    """Stage boundaries over the pipeline items [embed, blocks..., norm, head], cut by the
    one partitioner (engine.partition.partition_balanced) with the weights of
    `parallel.partition_method`: training FLOPs per item (balanced, what the pipeline engine
    cuts by), parameters per item (parameters), or one per block (uniform)."""
    method = cfg.parallel.partition_method
    if method == "balanced":
        weights, what = layer_costs(cfg.model, cfg.data.seq_len, cfg.parallel.embed_cost), "training FLOPs per item"
    elif method == "uniform":
        weights, what = [0.0] + [1.0] * (len(counts) - 3) + [0.0, 0.0], "blocks per stage"
    else:
        weights, what = [float(c) for c in counts], "parameter count"
    return partition_balanced(weights, parts), f"megatron_mgt.engine.partition ({method}: {what})"


def meta_model(cfg: Config, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return model.to(dtype)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _FusedAttention(torch.autograd.Function):
    """`attention.causal_attention` as a fused kernel on meta tensors: out = softmax(q k^T /
    sqrt(D), causal) v (its shape), saving what flash-attn and SDPA flash keep for backward:
    q, k, v, out [B, T, H, D] and the fp32 log-sum-exp [B, H, T]."""

    @staticmethod
    def forward(ctx, q, k, v, kernel="auto"):
        out = torch.empty_like(q)
        b, t, h, _ = q.shape
        ctx.save_for_backward(q, k, v, out, q.new_empty(b, h, t, dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # the plan runs forward only
        raise NotImplementedError


def saved_tensor_bytes(run, exclude=()) -> int:
    """Bytes of the tensors autograd keeps for backward while `run()` executes: each storage
    once (several views or aliases of one tensor count once), parameters and the tensors in
    `exclude` (say a model's buffers) not at all. Real tensors are told apart by storage
    address; meta tensors, which have none, by their base tensor."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if not t.is_meta}
    seen: dict[object, int] = {}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if isinstance(base, nn.Parameter):
            return t
        if t.is_meta:
            seen.setdefault(id(base), base.numel() * base.element_size())
        elif (ptr := t.untyped_storage().data_ptr()) not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def saved_bytes(run, fused_attention: bool) -> int:
    """`saved_tensor_bytes` of `run()`, with attention saving what a fused kernel keeps
    (`_FusedAttention`) when `fused_attention`, else what SDPA's math path keeps (the T x T
    softmax too)."""
    kernel = mock.patch.object(attention, "causal_attention", _FusedAttention.apply) if fused_attention else contextlib.nullcontext()
    with kernel:
        return saved_tensor_bytes(run)


def block_and_head_bytes(model: Transformer, batch: int, seq: int, dtype: torch.dtype, fused_attention: bool) -> tuple[int, int]:
    """Saved bytes of one block's forward and of final norm + head + loss, one micro-batch
    [batch, seq], on the model's device (meta for the plan; the stream is as wide as the rule
    makes it, n*d for mhc_nstream)."""
    cfg, device = model.cfg, model.head.weight.device
    x = model.rule_type.expand(torch.zeros(batch, seq, cfg.d_model, device=device, dtype=dtype), cfg).requires_grad_()
    targets = torch.zeros(batch, seq, device=device, dtype=torch.long)
    block = model.layers["0"]
    layer = saved_bytes(lambda: block(x), fused_attention)
    head = saved_bytes(lambda: lm_loss(model.head(model.norm(model.rule_type.collapse(x, cfg))), targets), fused_attention)
    return layer, head


def stage_activations(in_flight: int, n_blocks: int, interval: int, block: int, block_input: int, head: int) -> int:
    """Activation bytes of one stage: in_flight micro-batches x n_blocks blocks' saved tensors,
    or with checkpointing every k blocks in_flight x ceil(n_blocks / k) block inputs + the k
    blocks being recomputed; + the head's when the stage holds it (one micro-batch)."""
    k = min(interval, n_blocks)
    body = in_flight * -(-n_blocks // k) * block_input + k * block if k else in_flight * n_blocks * block
    return body + head


def build_plan(cfg: Config, cluster: Cluster, preset: str = "") -> Plan:
    m_cfg = cfg.model
    p = cluster.pipeline_stages
    problems: list[str] = []
    if p < 1:
        raise ConfigError(f"pipeline stages must be >= 1, got {p}")
    dp = cluster.data_parallel or max(1, cluster.gpus // p)
    if p * dp > cluster.gpus:
        problems.append(f"pp {p} x dp {dp} = {p * dp} GPUs but the cluster has {cluster.gpus}")
    micro = cluster.micro_batches or cfg.train.grad_accum_steps
    mbs = cluster.micro_batch_size or cfg.train.micro_batch_size
    seq = cfg.data.seq_len
    bf16 = bf16_enabled(cfg.train.precision, "cuda")  # the plan is for GPUs
    dtype = torch.bfloat16 if bf16 else torch.float32
    wbytes = 2 if bf16 else 4

    model = meta_model(cfg, dtype)
    unique = {id(q): q for q in model.parameters()}
    total = sum(q.numel() for q in unique.values())
    matmul = matmul_params(model)  # the count MFU uses (flops.py)

    # Pipeline items in order, each with the parameters its stage holds.
    names = ["embed"] + [f"layers.{i}" for i in model.layers] + ["norm", "head"]
    counts = (
        [model.embed.weight.numel()]
        + [_own_params(b) for b in model.layers.values()]
        + [_own_params(model.norm), model.head.weight.numel()]
    )
    if p > m_cfg.n_layers:
        raise ConfigError(f"{p} pipeline stages for {m_cfg.n_layers} layers")
    bounds, partition = split_items(cfg, counts, p)

    # Activations: one block and the head + loss, one micro-batch, measured on meta.
    fused = cluster.flash_attention
    layer_act, head_act = block_and_head_bytes(model, mbs, seq, dtype, fused)
    stream_width = model.rule_type.expand(torch.empty(1, 1, m_cfg.d_model, device="meta"), m_cfg).shape[-1]  # n*d for mhc_nstream
    layer_input = mbs * seq * stream_width * torch.empty(0, dtype=dtype).element_size()

    layout = state_layout(cfg, bf16, micro)
    if cfg.parallel.engine in ("fsdp", "deepspeed_zero") and p > 1:
        problems.append(f"parallel.engine={cfg.parallel.engine} has no pipeline: plan it with --pp 1")
    gathered_params = layout.gathered_blocks * max(counts[1 : m_cfg.n_layers + 1], default=0)
    if cfg.parallel.engine == "deepspeed_zero" and cfg.parallel.zero_stage == 3:  # a parameter reused within this many stays gathered
        reuse = deepspeed_config(cfg, dp, bf16)["zero_optimization"].get("stage3_max_reuse_distance", ZERO3_REUSE_DISTANCE)
        gathered_params = min(total, gathered_params + int(reuse))
    gathered = gathered_params * wbytes
    parts = []  # per stage: items, parameters, blocks, micro-batches in flight (1F1B: p - s), head activations
    for s in range(p):
        items = names[bounds[s] : bounds[s + 1]]
        n_blocks = sum(1 for it in items if it.startswith("layers."))
        shared = counts[-1] if m_cfg.tie_embeddings and "embed" in items and "head" in items else 0  # one stage holds the tied matrix once
        parts.append((items, sum(counts[bounds[s] : bounds[s + 1]]) - shared, n_blocks, min(p - s, micro), head_act if "head" in items else 0))

    def stage(s: int, interval: int) -> Stage:
        items, n_s, n_blocks, in_flight, head = parts[s]
        weights = n_s * layout.weight_bytes / (dp if layout.weights_sharded else 1) + gathered
        grads = n_s * layout.grad_bytes / (dp if layout.grads_sharded else 1)
        optim = n_s * layout.optimizer_bytes / dp
        act = stage_activations(in_flight, n_blocks, interval, layer_act, layer_input, head)
        total_gb = (weights + grads + optim + act) / GB + cluster.reserve_gb
        return Stage(s, items, n_s, weights / GB, grads / GB, optim / GB, in_flight, act / GB, total_gb, total_gb <= cluster.gpu_mem_gb)

    pipelined, notes = cfg.parallel.engine not in ("fsdp", "deepspeed_zero"), []
    if not pipelined and cluster.activation_checkpoint_interval > 1:
        cluster = replace(cluster, activation_checkpoint_interval=1)  # what the engine does
        notes.append(f"parallel.engine={cfg.parallel.engine} checkpoints every block or none (engine/single.checkpoint_blocks): planned with interval 1")
    stages = [stage(s, cluster.activation_checkpoint_interval) for s in range(p)]
    over = [st.index for st in stages if not st.fits]
    advice, advice_gb = 0, 0.0
    if over:  # the pipeline groups k blocks, the other engines checkpoint single blocks
        intervals = range(1, max(pt[2] for pt in parts) + 1) if pipelined else [1]
        advice_gb, advice = min((max(stage(s, k).total_gb for s in range(p)), k) for k in intervals)
    ckpt = total * (layout.weight_bytes + layout.optimizer_bytes)
    return Plan(
        preset=preset,
        total_params=total,
        matmul_params=matmul,
        n_layers=m_cfg.n_layers,
        cluster=cluster,
        dp=dp,
        micro_batches=micro,
        micro_batch_size=mbs,
        seq_len=seq,
        param_dtype="bf16" if bf16 else "fp32",
        tokens_per_step=mbs * micro * dp * seq,
        bubble=pipeline_bubble(p, micro),
        partition=partition,
        layer_activation_mb=layer_act / 1e6,
        layer_input_mb=layer_input / 1e6,
        layout=layout,
        head_activation_mb=head_act / 1e6,
        checkpoint_gb=ckpt / GB,
        checkpoint_write_s=ckpt / GB / cluster.ckpt_write_gbps,
        over=over,
        advice_interval=advice,
        advice_total_gb=advice_gb,
        stages=stages,
        problems=problems,
        notes=notes,
    )


def _item_range(items: list[str]) -> str:
    layers = [int(it.split(".")[1]) for it in items if it.startswith("layers.")]
    parts = []
    if "embed" in items:
        parts.append("embed")
    if layers:
        parts.append(f"L{layers[0]}-{layers[-1]} ({len(layers)})")
    if "head" in items:
        parts.append("head")
    return " + ".join(parts)


def _layout_line(lay: StateLayout, dp: int) -> str:
    def where(sharded: bool) -> str:
        return f"/ dp {dp}" if sharded else "whole"

    gathered = f", {lay.gathered_blocks} block(s) gathered whole" if lay.gathered_blocks else ""
    return (
        f"states      {lay.engine}, B/parameter per GPU: weights {lay.weight_bytes} {where(lay.weights_sharded)}, "
        f"grads {lay.grad_bytes} {where(lay.grads_sharded)}, optimizer {lay.optimizer_bytes} / dp {dp}{gathered}"
    )


def format_plan(plan: Plan) -> str:
    c = plan.cluster
    lines = [
        f"preset      {plan.preset or '(defaults)'}: {plan.n_layers} layers, {plan.total_params / 1e9:.3f} B parameters "
        f"({plan.total_params:,}; matmul {plan.matmul_params:,}), {plan.param_dtype}",
        f"cluster     {c.nodes} node(s) x {c.gpus_per_node} GPU(s), {c.gpu_mem_gb:g} GB each: pipeline {c.pipeline_stages} x data parallel {plan.dp}",
        f"batch       {plan.micro_batches} micro-batches x {plan.micro_batch_size} seq x {plan.seq_len} tokens x dp {plan.dp} = {plan.tokens_per_step:,} tokens/step",
        f"bubble      (p-1)/(m+p-1) = {c.pipeline_stages - 1}/{plan.micro_batches + c.pipeline_stages - 1} = {plan.bubble:.1%}",
        f"activations per block per micro-batch {plan.layer_activation_mb:.1f} MB (checkpointed: {plan.layer_input_mb:.1f} MB); "
        f"checkpointing {f'every {c.activation_checkpoint_interval} block(s)' if c.activation_checkpoint_interval else 'off'}, attention matrix {'not kept (flash)' if c.flash_attention else 'kept'}",
        f"partition   {plan.partition}",
        _layout_line(plan.layout, plan.dp),
        "",
        f"{'stage':>5}  {'holds':<26} {'params':>9} {'weights':>8} {'grads':>7} {'optim':>7} {'in-flight':>9} {'activ.':>8} {'total':>8}  fits",
        f"{'':>5}  {'':<26} {'(M)':>9} {'(GB)':>8} {'(GB)':>7} {'(GB)':>7} {'':>9} {'(GB)':>8} {'(GB)':>8}",
    ]
    for s in plan.stages:
        lines.append(
            f"{s.index:>5}  {_item_range(s.items):<26} {s.params / 1e6:>9.1f} {s.weights_gb:>8.2f} {s.grads_gb:>7.2f} {s.optimizer_gb:>7.2f} "
            f"{s.in_flight:>9} {s.activations_gb:>8.2f} {s.total_gb:>8.2f}  {'yes' if s.fits else 'NO'}"
        )
    lines.append("")
    lines.append(f"(total includes a {c.reserve_gb:g} GB reserve for CUDA context, NCCL buffers and fragmentation)")
    for problem in plan.problems:
        lines.append(f"problem: {problem}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    lay = plan.layout
    lines.append(
        f"checkpoint  {plan.checkpoint_gb:.1f} GB (weights + optimizer state: {lay.weight_bytes} + {lay.optimizer_bytes} B/parameter), "
        f"~{plan.checkpoint_write_s:.0f} s to write at {c.ckpt_write_gbps:g} GB/s aggregate (--ckpt-write-gbps)"
    )
    worst = max(plan.stages, key=lambda s: s.total_gb)
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"verdict     {verdict}: the fullest stage ({worst.index}) needs {worst.total_gb:.1f} of {c.gpu_mem_gb:g} GB")
    if plan.over:
        over = ", ".join(f"{s.index} ({s.total_gb:.1f} GB)" for s in plan.stages if not s.fits)
        lines.append(f"over        stage(s) above {c.gpu_mem_gb:g} GB: {over}")
    if plan.over:
        fits = plan.advice_total_gb <= c.gpu_mem_gb
        lines.append(
            f"advice      --activation-checkpoint-interval {plan.advice_interval} (parallel.activation_checkpoint_interval): "
            f"fullest stage {plan.advice_total_gb:.1f} GB, {'fits' if fits else 'still does not fit'}"
            + ("" if fits else "; add pipeline stages or data-parallel replicas (optimizer shards)")
        )
        if plan.layout.engine.startswith("fsdp") and not plan.layout.grads_sharded:
            lines.append("advice      parallel.fsdp_reduce_every_micro_batch=true shards the gradients (now whole on every GPU)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mgt-plan", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("preset", help="preset YAML (configs/...)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides of the preset")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0)
    ap.add_argument("--pp", type=int, default=0, help="pipeline stages (default: parallel.pipeline_stages of the preset, else 1)")
    ap.add_argument("--dp", type=int, default=0, help="data-parallel size (default: GPUs / pp)")
    ap.add_argument("--micro-batches", type=int, default=0, help="micro-batches per step per replica (default: train.grad_accum_steps)")
    ap.add_argument("--micro-batch-size", type=int, default=0, help="sequences per micro-batch (default: train.micro_batch_size)")
    ap.add_argument(
        "--activation-checkpoint-interval",
        type=int,
        default=None,
        help="recompute every N blocks, 0 = off (default: parallel.activation_checkpoint_interval)",
    )
    ap.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=True, help="fused attention keeps no T x T matrix")
    ap.add_argument("--reserve-gb", type=float, default=4.0)
    ap.add_argument(
        "--ckpt-write-gbps", type=float, default=2.0, help="aggregate file-system write bandwidth for the checkpoint time (GB/s)"
    )
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def _preset_parallel(cfg: Config, name: str, default):
    """A ParallelConfig field if this version of the config has it."""
    return getattr(cfg.parallel, name, default)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.preset, args.overrides)
        ckpt = args.activation_checkpoint_interval
        if ckpt is None:
            ckpt = int(_preset_parallel(cfg, "activation_checkpoint_interval", 0))
        cluster = Cluster(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu_mem_gb=args.gpu_mem_gb,
            pipeline_stages=args.pp or int(_preset_parallel(cfg, "pipeline_stages", 1) or 1),
            data_parallel=args.dp,
            micro_batches=args.micro_batches,
            micro_batch_size=args.micro_batch_size,
            activation_checkpoint_interval=ckpt,
            flash_attention=args.flash_attention,
            reserve_gb=args.reserve_gb,
            ckpt_write_gbps=args.ckpt_write_gbps,
        )
        plan = build_plan(cfg, cluster, args.preset)
    except (ConfigError, ValueError) as err:
        print(f"mgt-plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps({**asdict(plan), "fits": plan.fits}, indent=1))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
