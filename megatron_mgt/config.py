"""The single source of every knob: dataclasses, YAML presets, dotted CLI overrides.

A preset is a YAML mapping shaped like `Config`; it may name a parent with `inherit:`
(a path relative to the preset). Overrides are `section.key=value` strings, parsed as
YAML scalars (`train.lr=3e-4`, `model.residual=preln`, `model.mgt.lam=0.5`).
Unknown keys and wrong types are errors that name the key and the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RESIDUALS = ("preln", "postln", "deepnorm", "mhc", "ddl", "mgt", "ddl_rank1", "mhc_nstream")


class ConfigError(ValueError):
    """A preset or override that does not fit the config schema."""


@dataclass
class MGTConfig:
    """Open knobs of the MGT update (spec section 1); used by `mhc`, `ddl` and `mgt`.

    beta = lam * tanh(X W_beta + b_beta) + eps, so beta lies in [eps - lam, eps + lam].
    Defaults chosen by the knob sweep of docs/RESULTS.md Appendix A section 7 (12 layers, CPU size, one
    knob at a time): each is the best or tied-best value tried there. The evidence is weak
    (one seed, 61k tokens); beta_init is the one to re-test at 100-200 layers.
    """

    lam: float = 1.0
    eps: float = 0.0
    beta_init: float = 0.1  # beta at init: W_beta = 0, b_beta = atanh((beta_init - eps)/lam)
    alpha_init: float = 0.1
    alpha_mode: Literal["fixed", "scalar", "channel"] = "scalar"  # fixed = not learned
    beta_granularity: Literal["channel", "token"] = "channel"  # W_beta: d x d or d x 1
    controller_input: Literal["x", "ln"] = "x"  # gate/controller read X_l or LN(X_l)


@dataclass
class Rank1DDLConfig:
    """Knobs of the `ddl_rank1` comparator (docs/RESIDUALS.md); defaults not swept (provisional)."""

    beta_init: float = 0.1  # beta at init, in (0, 2): w = 0, b = logit(beta_init / 2)
    value_input: Literal["x", "ln"] = "x"  # the scalar value v = w_v . C + b_v reads C = X_l or LN(X_l)
    k_eps: float = 1e-5  # k = F / sqrt(|F|^2 + k_eps^2)


@dataclass
class NStreamMHCConfig:
    """Knobs of the `mhc_nstream` comparator besides `model.mhc_streams` (docs/RESIDUALS.md)."""

    gate_init: float = 0.01  # a_pre, a_post, a_res at init
    res_diag_init: float = 0.95  # diagonal of H_res at init (off-diagonal (1 - it) / (n - 1))
    sinkhorn_iters: int = 20


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    d_model: int = 256
    n_layers: int = 12
    n_heads: int = 4
    d_ff: int = 0  # 0: SwiGLU 8/3*d rounded up to a multiple of 64; GELU 4*d
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    final_norm: bool = True  # a norm (model.norm) before the LM head (spec 1: standard; an open knob)
    residual: str = "mgt"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # every norm of the model (model/norm.py); the spec writes LN
    norm_eps: float = 1e-5
    init_std: float = 0.02
    scale_init_by_depth: bool = True  # output projections std / sqrt(2 * n_layers) (GPT-2)
    attention_kernel: Literal["auto", "sdpa", "flash"] = "auto"
    mgt: MGTConfig = field(default_factory=MGTConfig)
    ddl_rank1: Rank1DDLConfig = field(default_factory=Rank1DDLConfig)
    mhc_streams: int = 4  # mhc_nstream: number of residual streams n
    mhc_nstream: NStreamMHCConfig = field(default_factory=NStreamMHCConfig)
    fused_residual: bool = False  # mhc/ddl/mgt: the elementwise tail as one recomputed region (model/fused.py); other rules have none
    fused_recompute_projections: bool = False  # with fused_residual: the gate / controller projections recomputed too (2 d x d matmuls in backward, 2 d-sized tensors less saved per sublayer)
    compile: bool = False  # torch.compile every block, applied by the engine after building the model (engine/single.py)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return -(-int(8 * self.d_model / 3) // 64) * 64
        return 4 * self.d_model


@dataclass
class DataConfig:
    train_prefix: str = ""  # path prefix of the .bin/.idx training shard
    valid_prefix: str = ""
    test_prefix: str = ""  # optional test shard, scored by mgt-eval with eval.full_split
    tokenizer: str = ""  # sentencepiece .model, for decoding samples and meta
    seq_len: int = 256


@dataclass
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | none | path to a checkpoint dir
    exit_at_step: int = 0  # >0: checkpoint and exit after this step (schedule still spans max_steps)
    exit_after_minutes: float = 0.0  # >0: checkpoint and exit once this wall time has passed (job limits)
    run_dir: str = "runs/default"
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    cpu_malloc: Literal["keep", "default"] = "keep"  # CPU runs: keep = glibc malloc keeps freed memory (fewer page faults; mgt +5% tokens/s measured twice, engine/host_memory.py); default = glibc's own


PARTITION_METHODS = ("balanced", "parameters", "uniform")


@dataclass
class ParallelConfig:
    """How a step is distributed (docs/ENGINES.md). Batch size, accumulation, lr, clipping
    and precision stay in `train`; engines write them into their own configs."""

    engine: Literal["single", "deepspeed_pipe", "deepspeed_zero", "fsdp"] = "single"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    pipeline_stages: int = 1  # deepspeed_pipe: stages; data parallel = world_size / stages
    zero_stage: int = 1  # deepspeed_pipe: 1; deepspeed_zero: 1, 2 or 3
    deepspeed_config: str = ""  # JSON with DeepSpeed-only options (ZeRO buckets, bf16 extras)
    activation_checkpoint_interval: int = 0  # recompute in backward: deepspeed_pipe groups of N blocks; the other engines every block (1); 0 = off
    partition_method: str = "balanced"  # deepspeed_pipe: balanced (cost model) | parameters | uniform
    embed_cost: float = 1.0  # balanced: cost of the embedding stage item, in blocks (Megatron counts it as one layer)
    fsdp_reshard_after_forward: bool = True  # fsdp: free gathered params after forward (ZeRO-3-like)
    fsdp_reduce_every_micro_batch: bool = False  # fsdp: reduce-scatter gradients after every micro-batch (sharded accumulation) instead of once per step
    dist_timeout_minutes: float = 30.0  # collective timeout (init_process_group, deepspeed.init_distributed): a hung rank fails the job


@dataclass
class LogConfig:
    every: int = 10
    wandb: Literal["auto", "offline", "online", "disabled"] = "auto"  # auto: online with an API key, else offline
    wandb_project: str = "megatron_mgt"
    wandb_group: str = ""  # groups the runs of one study (slurm/wt103_stability.sh sets the array's name)
    run_name: str = ""
    progress: bool = True
    geometry_every: int = 100  # geometry telemetry on the fixed probe batch every N steps (+ step 0); 0 = off


@dataclass
class EvalConfig:
    batches: int = 50  # held-out batches for perplexity
    geometry_batch: int = 4  # sequences in the fixed geometry-snapshot batch
    center: bool = True  # centre token matrices before effective rank
    spectrum: Literal["svd", "gram"] = "svd"  # singular values for erank: float64 SVD (reference) or the Gram matrix's eigenvalues (fast on GPUs at large d)
    full_split: bool = False  # mgt-eval also scores every token of valid (and test): ppl per token and per word
    stride: int = 0  # full_split windows start every N tokens (0: seq_len, no overlap); < seq_len gives every token more context
    rank_windows: int = 0  # >0: mgt-eval adds the collapse-robust rank profile on this many windows spread over valid


@dataclass
class StabilityConfig:
    """Spike monitoring in the trainer, on by default (megatron_mgt/stability.py has the rule)."""

    enabled: bool = True
    response: Literal["record", "skip", "rollback"] = "record"
    act_on: Literal["loss", "any"] = "loss"  # what skip / rollback respond to: loss spikes + non-finite, or every kind
    window: int = 100  # running mean / std over the last N accepted steps
    min_history: int = 20  # no spike test before this many accepted steps
    z: float = 6.0  # spike: value > mean + max(z * std, rel * |mean|)
    loss_rel: float = 0.1
    grad_norm_rel: float = 1.0
    update_norm_rel: float = 1.0
    update_norm: bool = True  # measure |update| every step (from AdamW's state; needed for update-norm spikes)
    max_actions: int = 10  # skips + rollbacks before the run stops as diverged


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)


def _nearest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}{_nearest(str(value), map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not match {annotation}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is type(None) and value is None:
        return None
    if isinstance(annotation, type) and (not isinstance(value, annotation) or (annotation is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def merge(obj: Any, data: dict, where: str = "") -> None:
    """Write a nested mapping into a dataclass instance, validating every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_nearest(str(key), fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def read_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML preset as a nested mapping, with its `inherit:` chain resolved (child wins)."""
    path = path.resolve()
    if path in _chain:
        raise ConfigError(f"inherit cycle: {' -> '.join(map(str, _chain + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    base = read_yaml(path.parent / parent, _chain + (path,))
    return deep_update(base, data)


def deep_update(base: dict, new: dict) -> dict:
    """`new` merged into `base` in place, nested dicts key by key (an override of one nested key keeps its siblings)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def parse_override(text: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}, value parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({str(err).splitlines()[0]})") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def validate(cfg: Config) -> None:
    """Cross-field checks that a type check alone cannot make."""
    m = cfg.model
    if m.residual not in RESIDUALS:
        raise ConfigError(f"model.residual: '{m.residual}' is not one of {list(RESIDUALS)}{_nearest(m.residual, RESIDUALS)}")
    for name in ("d_model", "n_heads", "vocab_size"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(m, name)} must be positive")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even for RoPE")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    g = m.mgt
    if g.lam <= 0:
        raise ConfigError(f"model.mgt.lam={g.lam} must be > 0")
    if not abs(g.beta_init - g.eps) < g.lam:
        raise ConfigError(f"model.mgt.beta_init={g.beta_init} must lie strictly inside (eps - lam, eps + lam) = ({g.eps - g.lam}, {g.eps + g.lam})")
    if not 0 < m.ddl_rank1.beta_init < 2:
        raise ConfigError(f"model.ddl_rank1.beta_init={m.ddl_rank1.beta_init} must lie strictly inside (0, 2)")
    if m.mhc_streams < 1 or m.mhc_nstream.sinkhorn_iters < 1:
        raise ConfigError("model.mhc_streams and model.mhc_nstream.sinkhorn_iters must be >= 1")
    if m.mhc_streams > 1 and not 0 < m.mhc_nstream.res_diag_init < 1:
        raise ConfigError(f"model.mhc_nstream.res_diag_init={m.mhc_nstream.res_diag_init} must lie strictly inside (0, 1)")
    if not m.final_norm and cfg.parallel.engine == "deepspeed_pipe":
        raise ConfigError("model.final_norm=false is not supported by parallel.engine=deepspeed_pipe yet (its layer specs and checkpoint layout hold a final-norm stage)")
    if m.residual == "mhc_nstream" and cfg.parallel.engine == "deepspeed_pipe":
        raise ConfigError("model.residual=mhc_nstream is not supported by parallel.engine=deepspeed_pipe yet (its layer specs carry a [B, T, d] stream)")
    if m.fused_recompute_projections and not m.fused_residual:
        raise ConfigError("model.fused_recompute_projections=true needs model.fused_residual=true (it widens the fused region)")
    if m.compile and cfg.parallel.engine == "deepspeed_pipe":
        raise ConfigError("model.compile=true is not supported by parallel.engine=deepspeed_pipe yet (DeepSpeed builds its LayerSpec blocks itself)")
    if m.n_layers < (1 if cfg.parallel.engine == "deepspeed_pipe" else 0):
        raise ConfigError(f"model.n_layers={m.n_layers} must be >= 0 (0: embedding + head, a baseline), >= 1 with the pipeline")
    t = cfg.train
    for name in ("micro_batch_size", "grad_accum_steps", "max_steps"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive")
    if not 0 <= cfg.eval.stride <= cfg.data.seq_len:
        raise ConfigError(f"eval.stride={cfg.eval.stride} must lie in [0, data.seq_len={cfg.data.seq_len}] (0: seq_len)")
    if cfg.eval.rank_windows < 0:
        raise ConfigError(f"eval.rank_windows={cfg.eval.rank_windows} must be >= 0 (0: no rank profile)")
    if cfg.log.geometry_every < 0:
        raise ConfigError(f"log.geometry_every={cfg.log.geometry_every} must be >= 0 (0 disables telemetry)")
    st = cfg.stability
    if st.window < 2 or st.min_history < 0 or st.max_actions < 0 or st.z < 0:
        raise ConfigError(f"stability: window={st.window} must be >= 2, min_history={st.min_history}, max_actions={st.max_actions} and z={st.z} >= 0")
    if st.response == "skip" and cfg.parallel.engine.startswith("deepspeed"):
        raise ConfigError(
            f"stability.response=skip with parallel.engine={cfg.parallel.engine}: DeepSpeed steps the optimizer inside "
            "train_batch / engine.step, so the trainer cannot withhold one step. Use rollback (or record), or engine single / fsdp."
        )
    validate_parallel(cfg)


def validate_parallel(cfg: Config) -> None:
    p = cfg.parallel
    if p.pipeline_stages < 1:
        raise ConfigError(f"parallel.pipeline_stages={p.pipeline_stages} must be >= 1")
    if p.pipeline_stages > 1 and p.engine != "deepspeed_pipe":
        raise ConfigError(f"parallel.pipeline_stages={p.pipeline_stages} needs parallel.engine=deepspeed_pipe (engine is '{p.engine}')")
    if not 0 <= p.zero_stage <= 3:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    if p.engine == "deepspeed_pipe" and p.zero_stage >= 2:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with parallel.engine=deepspeed_pipe: DeepSpeed asserts 'ZeRO-2 and ZeRO-3 are "
            "incompatible with pipeline parallelism' (gradient partitioning conflicts with the pipeline's per-micro-batch "
            "gradient accumulation). Use zero_stage 1 with the pipeline, or engine=deepspeed_zero / fsdp without it."
        )
    if p.engine == "deepspeed_pipe" and p.zero_stage != 1:
        raise ConfigError("parallel.engine=deepspeed_pipe needs parallel.zero_stage=1 (with stage 0 DeepSpeed's fp32 pipeline reports no gradient norm)")
    if p.engine == "deepspeed_zero" and p.zero_stage < 1:
        raise ConfigError("parallel.engine=deepspeed_zero needs parallel.zero_stage 1, 2 or 3")
    if p.activation_checkpoint_interval < 0:
        raise ConfigError(f"parallel.activation_checkpoint_interval={p.activation_checkpoint_interval} must be >= 0")
    if p.activation_checkpoint_interval > 1 and p.engine != "deepspeed_pipe":
        raise ConfigError(
            f"parallel.activation_checkpoint_interval={p.activation_checkpoint_interval} with parallel.engine={p.engine}: only "
            "deepspeed_pipe checkpoints groups of blocks; the other engines checkpoint every block (1) or none (0)"
        )
    if p.partition_method not in PARTITION_METHODS:
        raise ConfigError(f"parallel.partition_method: '{p.partition_method}' is not one of {list(PARTITION_METHODS)}{_nearest(p.partition_method, PARTITION_METHODS)}")
    if p.embed_cost < 0:
        raise ConfigError(f"parallel.embed_cost={p.embed_cost} must be >= 0")
    if p.dist_timeout_minutes <= 0:
        raise ConfigError(f"parallel.dist_timeout_minutes={p.dist_timeout_minutes} must be > 0")
    if p.deepspeed_config and not p.engine.startswith("deepspeed"):
        raise ConfigError(f"parallel.deepspeed_config is set but parallel.engine='{p.engine}' is not a DeepSpeed engine")


# What a resumed run may change: it takes effect (the optimizer is retuned to this run's train.*)
# and the trainer logs it with old and new values. A pattern ending in ".*" covers a section.
# Every other key (model shape, residual rule, seed, batch shape, training data) must equal the
# checkpoint's, or the resume is refused naming the key and both values. docs/ROBUSTNESS.md.
RESUME_MAY_CHANGE = (
    "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.max_steps", "train.weight_decay", "train.beta1", "train.beta2",
    "train.grad_clip", "train.eval_every", "train.eval_batches", "train.save_every", "train.keep_checkpoints", "train.resume",
    "train.exit_at_step", "train.exit_after_minutes", "train.run_dir", "train.threads", "train.cpu_malloc", "train.device", "train.precision",
    "data.valid_prefix", "data.test_prefix", "data.tokenizer", "parallel.*", "log.*", "eval.*", "stability.*",
    # how the same model is computed (the same weights, the same function): kernels, fusion, compile
    "model.attention_kernel", "model.fused_residual", "model.fused_recompute_projections", "model.compile",
)  # fmt: skip


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


BATCH_SPLIT_KEYS = ("train.micro_batch_size", "train.grad_accum_steps")  # may change when the global batch does not


def resume_changes(saved: dict, current: dict, saved_dp: int = 1, current_dp: int = 1) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, this run's value) for every key that differs between a
    checkpoint's config and this run's; ConfigError naming each key that RESUME_MAY_CHANGE
    does not allow. The split of the global batch (micro_batch_size x grad_accum_steps x
    data-parallel size, `saved_dp` / `current_dp`) may change when the global batch stays
    the same: the data order and the step's mean loss are then the same (another engine or
    world size continuing a run). Keys only one side has (an older or newer schema) are not
    compared."""
    old, new = _flat(saved), _flat(current)
    changes = [(key, old[key], new[key]) for key in new if key in old and old[key] != new[key]]

    def global_batch(flat: dict, dp: int):
        return flat.get("train.micro_batch_size", 0) * flat.get("train.grad_accum_steps", 1) * dp

    split_ok = global_batch(old, saved_dp) == global_batch(new, current_dp)
    allowed = {
        key for key, _, _ in changes if key in RESUME_MAY_CHANGE or f"{key.split('.')[0]}.*" in RESUME_MAY_CHANGE or (split_ok and key in BATCH_SPLIT_KEYS)
    }
    refused = [f"{key} is {a!r} in the checkpoint and {b!r} in this run" for key, a, b in changes if key not in allowed]
    if refused:
        raise ConfigError("; ".join(refused) + " (these cannot change on resume: use a new train.run_dir, or train.resume=none to start over)")
    return changes


def load_config(preset: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- preset YAML (with inheritance) <- dotted overrides, then validated."""
    cfg = Config()
    if preset:
        merge(cfg, read_yaml(Path(preset)))
    for text in overrides:
        merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    merge(cfg, data)
    validate(cfg)
    return cfg


def override_text(key: str, value: Any) -> str:
    """The dotted override 'key=value' that sets `value` (lists and mappings as JSON, which YAML reads)."""
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"


def derive(base: Config, changes: typing.Mapping[str, Any]) -> Config:
    """A validated copy of `base` with dotted `changes` ({'train.lr': 1e-3, ...}) applied."""
    cfg = Config()
    merge(cfg, to_dict(base))
    for key, value in changes.items():
        merge(cfg, parse_override(override_text(key, value)))
    validate(cfg)
    return cfg
