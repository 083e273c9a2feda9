"""Convert model weights between checkpoint layouts.

    mgt-convert SRC_CKPT DST_CKPT --to single|pipe|dcp [--config RUN/config.yaml]

Layouts (docs/ENGINES.md), detected from the files in SRC_CKPT:

    single  model.pt: the single engine's state dict (what mgt-eval loads)
    pipe    layer_NN-model_states.pt: DeepSpeed pipeline, one file per pipeline layer
            [0 embedding, 1..L blocks, L+1 final norm, L+2 head (untied only)]
    dcp     dcp/: torch.distributed.checkpoint directory of the FSDP engine ('model.*' keys)
    zero    *_model_states.pt + *_optim_states.pt of the DeepSpeed ZeRO engine (source only;
            consolidated with DeepSpeed's zero_to_fp32)

Every conversion goes through the single layout, so any source reaches any target. The
weights are converted, not the optimizer state: DST_CKPT gets the source's trainer.pt
(step, data position, config), so it evaluates as it is and `train.resume=DST_CKPT`
continues from its step with fresh AdamW moments (the schedule is set to the step).
Pipeline files do not depend on the stage count, so one conversion serves any cut.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from megatron_mgt.checkpoint import TRAINER_STATE, load_trainer_state
from megatron_mgt.config import Config, ConfigError, ModelConfig, from_dict, load_config

LAYOUTS = ("single", "pipe", "dcp", "zero")
MODEL_FILE = "model.pt"
DCP_DIR = "dcp"
_LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt$")


def detect_layout(directory: Path) -> str:
    if (directory / MODEL_FILE).is_file():
        return "single"
    if any(_LAYER_FILE.search(p.name) for p in directory.glob("layer_*-model_states.pt")):
        return "pipe"
    if (directory / DCP_DIR / ".metadata").is_file():
        return "dcp"
    if any(directory.glob("*optim_states.pt")):
        return "zero"
    raise FileNotFoundError(f"{directory}: no model.pt, layer_*-model_states.pt, dcp/ or DeepSpeed ZeRO files")


def pipe_layer_file(directory: Path, layer: int) -> Path:
    """DeepSpeed's name for a pipeline layer file (PipelineModule.ckpt_layer_path)."""
    return directory / f"layer_{layer:02d}-model_states.pt"


def _pipe_names(cfg: ModelConfig, layer: int) -> str:
    if layer == 0:
        return "embed."
    if layer <= cfg.n_layers:
        return f"layers.{layer - 1}."
    return "norm." if layer == cfg.n_layers + 1 else "head."


def read_pipe(directory: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    last = cfg.n_layers + 2 if not cfg.tie_embeddings else cfg.n_layers + 1
    for layer in range(last + 1):
        path = pipe_layer_file(directory, layer)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing pipeline layer file (model has {cfg.n_layers} blocks, tie_embeddings={cfg.tie_embeddings})")
        prefix = _pipe_names(cfg, layer)
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            state[prefix + key] = value
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state


def write_pipe(state: dict[str, torch.Tensor], directory: Path, cfg: ModelConfig) -> None:
    last = cfg.n_layers + 2 if not cfg.tie_embeddings else cfg.n_layers + 1
    for layer in range(last + 1):
        prefix = _pipe_names(cfg, layer)
        part = {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}
        torch.save(part, pipe_layer_file(directory, layer))


def read_dcp(directory: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="mgt_convert_") as tmp:
        dcp_to_torch_save(directory / DCP_DIR, Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    return dict(full["model"])


def write_dcp(state: dict[str, torch.Tensor], directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": state}, checkpoint_id=str(directory / DCP_DIR), no_dist=True)


def read_zero(directory: Path) -> dict[str, torch.Tensor]:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name))


def read_state(directory: Path, cfg: ModelConfig, layout: str | None = None) -> dict[str, torch.Tensor]:
    """Single-layout state dict of the checkpoint in `directory`."""
    layout = layout or detect_layout(directory)
    if layout == "single":
        return torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    if layout == "pipe":
        return read_pipe(directory, cfg)
    if layout == "dcp":
        return read_dcp(directory)
    return read_zero(directory)


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """The state must load into `Transformer(cfg)` (names and shapes), else a clear error."""
    from megatron_mgt.model import Transformer

    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state does not fit the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{key}: shape {tuple(state[key].shape)} != model's {tuple(value.shape)}")


def convert(src: Path, dst: Path, to: str, cfg: Config | None = None) -> Path:
    """Write the weights of checkpoint `src` into `dst` in layout `to`; copy trainer.pt."""
    if to not in ("single", "pipe", "dcp"):
        raise ValueError(f"--to must be single, pipe or dcp, not {to!r}")
    src, dst = Path(src), Path(dst)
    if cfg is None:
        if not (src / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"{src}: no {TRAINER_STATE} to read the model config from; pass --config")
        cfg = from_dict(load_trainer_state(src)["config"])
    state = read_state(src, cfg.model)
    check_state(state, cfg.model)
    if cfg.model.tie_embeddings:  # one tensor under both names, as Transformer holds it
        if not torch.equal(state["head.weight"], state["embed.weight"]):
            raise ValueError(f"{src}: model.tie_embeddings is set but head.weight differs from embed.weight")
        state["head.weight"] = state["embed.weight"]
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: not empty")
    dst.mkdir(parents=True, exist_ok=True)
    if to == "single":
        torch.save(state, dst / MODEL_FILE)
    elif to == "pipe":
        write_pipe(state, dst, cfg.model)
    else:
        write_dcp(state, dst)
    if (src / TRAINER_STATE).is_file():
        shutil.copy2(src / TRAINER_STATE, dst / TRAINER_STATE)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint dir (RUN/checkpoints/step_NNNNNNNN)")
    parser.add_argument("dst", type=Path, help="new checkpoint dir (must be empty or absent)")
    parser.add_argument("--to", required=True, choices=("single", "pipe", "dcp"))
    parser.add_argument("--config", type=Path, default=None, help="YAML of the model (default: the config in SRC/trainer.pt)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else None
        layout = detect_layout(args.src)
        out = convert(args.src, args.dst, args.to, cfg)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"mgt-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"mgt-convert: {layout} {args.src} -> {args.to} {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
