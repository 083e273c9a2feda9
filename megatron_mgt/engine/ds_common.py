"""What both DeepSpeed engines share: importing DeepSpeed safely on CPU, building its
config dict with the project's TrainConfig as the one source of the training knobs, saving
and loading DeepSpeed checkpoints, and the update norm under its ZeRO optimizers.

The JSON named by `parallel.deepspeed_config` (configs/deepspeed/*.json) holds only what the
YAML presets do not: ZeRO bucket sizes and overlap, bf16 extras, communication dtype,
activation-checkpointing options, ... The keys the project owns are written here at engine
build; a JSON that sets one of them (or a ZeRO stage / bf16 switch that disagrees with
`parallel.zero_stage` / `train.precision`) is a ConfigError naming the YAML key to use.

Gradients accumulate in fp32 (`data_types.grad_accum_dtype`): with bf16 weights DeepSpeed
otherwise sums the micro-batch gradients in bf16 (8 mantissa bits over 64 micro-batches).
DeepSpeed 0.19.8 (`engine._do_optimizer_sanity_check`) then wraps ZeRO-1 in its
BF16_Optimizer (an fp32 gradient buffer per parameter, fp32 master weights partitioned over
dp: the pipeline's optimizer) and gives ZeRO-2 a separate fp32 accumulator; ZeRO-3 gets it
as its gradient_accumulation_dtype (an fp32 gradient partition). With fp32 weights the key equals the model dtype and changes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from megatron_mgt.config import Config, ConfigError
from megatron_mgt.engine.base import checkpoint_step
from megatron_mgt.engine.dist import all_sum
from megatron_mgt.engine.optim import adamw_update_sq_norm, inner_adamw, scheduled_lrs, set_schedule_step

REPO_ROOT = Path(__file__).resolve().parents[2]

# DeepSpeed key -> the project key that sets it
PROJECT_OWNED = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x data-parallel size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr / beta1 / beta2 / weight_decay (the engine passes torch AdamW)",
    "scheduler": "train.warmup_steps / min_lr_ratio / max_steps (the engine passes the warmup-cosine LambdaLR)",
    "fp16": "train.precision (fp16 is not supported; bf16 or fp32)",
    "data_types.grad_accum_dtype": "the project (always fp32: gradients accumulate in fp32 over the micro-batches)",
}
GRAD_ACCUM_DTYPE = "fp32"


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with the CPU accelerator on CPU and without the shared-memory
    comm op (its JIT build takes 80-110 s and gloo does not need it)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import logger

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logger.setLevel(logging.WARNING)  # the trainer reports; DeepSpeed's INFO lines drown it
    return deepspeed


def resolve_config_path(path: str) -> Path:
    """Absolute, else relative to the working directory, else to the repository root."""
    for candidate in (Path(path), Path.cwd() / path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"parallel.deepspeed_config: file not found: {path} (looked in {Path.cwd()} and {REPO_ROOT})")


def deepspeed_config(cfg: Config, dp_size: int, bf16: bool) -> dict:
    """The JSON options, plus batch / accumulation / clipping / ZeRO stage / bf16 from the YAML."""
    extra: dict = {}
    source = cfg.parallel.deepspeed_config
    if source:
        path = resolve_config_path(source)
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"parallel.deepspeed_config {path}: not valid JSON: {err}") from err
    for key, owner in PROJECT_OWNED.items():
        section, _, name = key.rpartition(".")
        if name in (extra.get(section, {}) if section else extra):
            raise ConfigError(f"parallel.deepspeed_config {source}: '{key}' is set by {owner}; remove it from the JSON")
    tc = cfg.train
    zero = dict(extra.pop("zero_optimization", {}))
    if "stage" in zero and zero["stage"] != cfg.parallel.zero_stage:
        raise ConfigError(
            f"parallel.deepspeed_config {source}: zero_optimization.stage={zero['stage']} disagrees with parallel.zero_stage={cfg.parallel.zero_stage}"
        )
    zero["stage"] = cfg.parallel.zero_stage
    bf16_section = dict(extra.pop("bf16", {}))
    if "enabled" in bf16_section and bool(bf16_section["enabled"]) != bf16:
        raise ConfigError(
            f"parallel.deepspeed_config {source}: bf16.enabled={bf16_section['enabled']} disagrees with train.precision={tc.precision} on this device"
        )
    bf16_section["enabled"] = bf16
    config = {
        "steps_per_print": 10**9,  # the trainer logs
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        **extra,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum_steps,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum_steps * dp_size,
        "gradient_clipping": tc.grad_clip if tc.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": bf16_section,
        "data_types": {**extra.get("data_types", {}), "grad_accum_dtype": GRAD_ACCUM_DTYPE},
    }
    # The pipeline's data-parallel replicas split the writing of their stage's layer files
    # (PipelineModule.save_state_dict; without it replica 0 writes all of them), unless the JSON says otherwise.
    checkpoint = dict(extra.get("checkpoint", {}))
    checkpoint["parallel_write"] = {"pipeline_stage": True, **checkpoint.get("parallel_write", {})}
    config["checkpoint"] = checkpoint
    return config


def ds_save(engine, directory: Path) -> None:
    """DeepSpeed writes into save_dir/tag: the step dir is parent/name."""
    engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)


def ds_load(engine, directory: Path) -> None:
    """Full state when the checkpoint has optimizer files, else weights only (converted)."""
    has_optim = any(directory.glob("*optim_states.pt"))
    path, _ = engine.load_checkpoint(
        str(directory.parent), tag=directory.name, load_optimizer_states=has_optim, load_lr_scheduler_states=has_optim, load_module_only=not has_optim
    )
    if path is None:
        raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint to load")
    if not has_optim:
        set_schedule_step(engine.lr_scheduler, checkpoint_step(directory))


def update_norm(cfg: Config, engine, device: torch.device, counted_twice: torch.Tensor | None = None) -> float | None:
    """|update| of the step DeepSpeed just applied (None if it skipped one, or when
    `stability.update_norm` is off), from the torch AdamW under its ZeRO optimizer: each
    rank's partition, summed over all ranks. `counted_twice` is the squared update of a
    weight this rank's stage holds a second copy of (the pipeline's tied embedding, on the
    last stage), taken out of the sum."""
    if not (cfg.stability.enabled and cfg.stability.update_norm and engine.was_step_applied()):
        return None
    adamw, params = inner_adamw(engine.optimizer), None
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3 hands AdamW one sub-group at a time
        params = [[] for _ in adamw.param_groups]
        for sub_group, flat in enumerate(engine.optimizer.fp32_partitioned_groups_flat):
            params[engine.optimizer.sub_group_to_group_id[sub_group]].append(flat)
    sq = adamw_update_sq_norm(adamw, scheduled_lrs(engine.lr_scheduler), params)
    if counted_twice is not None:
        sq = sq - counted_twice.double().cpu()
    return math.sqrt(max(0.0, float(all_sum(sq.to(device)))))
