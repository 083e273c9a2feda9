"""Convert model weights between checkpoint layouts.

    mgt-convert SRC_CKPT DST_CKPT --to single|pipe|dcp [--config RUN/config.yaml]

Layouts (docs/ENGINES.md; each engine module owns its own, megatron_mgt.engine.detect_layout
tells them apart by the files in SRC_CKPT):

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
import shutil
import sys
from pathlib import Path

import torch

from megatron_mgt.checkpoint import TRAINER_STATE, load_trainer_state
from megatron_mgt.config import Config, ConfigError, ModelConfig, from_dict, load_config
from megatron_mgt.engine import detect_layout, layout_class, read_weights
from megatron_mgt.model import Transformer

TARGETS = ("single", "pipe", "dcp")


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """The state must load into `Transformer(cfg)` (names and shapes), else a clear error."""
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
    if to not in TARGETS:
        raise ValueError(f"--to must be single, pipe or dcp, not {to!r}")
    src, dst = Path(src), Path(dst)
    if cfg is None:
        if not (src / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"{src}: no {TRAINER_STATE} to read the model config from; pass --config")
        cfg = from_dict(load_trainer_state(src)["config"])
    state = read_weights(src, cfg.model)
    check_state(state, cfg.model)
    if cfg.model.tie_embeddings:  # one tensor under both names, as Transformer holds it
        if not torch.equal(state["head.weight"], state["embed.weight"]):
            raise ValueError(f"{src}: model.tie_embeddings is set but head.weight differs from embed.weight")
        state["head.weight"] = state["embed.weight"]
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: not empty")
    dst.mkdir(parents=True, exist_ok=True)
    layout_class(to).write_weights(state, dst, cfg.model)
    if (src / TRAINER_STATE).is_file():
        shutil.copy2(src / TRAINER_STATE, dst / TRAINER_STATE)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint dir (RUN/checkpoints/step_NNNNNNNN)")
    parser.add_argument("dst", type=Path, help="new checkpoint dir (must be empty or absent)")
    parser.add_argument("--to", required=True, choices=TARGETS)
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
