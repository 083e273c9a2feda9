"""Signal propagation at initialisation for any residual variant and depth (spec 3.7,
Cowsik et al. 2024).

    python -m megatron_mgt.signal_prop [PRESET.yaml] [section.key=value ...]

The block stack of a freshly initialised model (embedding, final norm and head bypassed)
is fed nearly collapsed tokens X = sqrt(rho) g + sqrt(1 - rho) Z (geometry.collapsed_tokens,
rho = 0.99) as its residual stream, expanded / collapsed by the rule's stream hooks like the
model does (mhc_nstream: replicated into n streams, reported as their mean):

- angle exponent of block l: lambda_a = log[(1 - p'/q') / (1 - p/q)] with X fed to block l
  alone (every block starts from the same collapsed X); reported per block and averaged.
  > 0: the block pulls nearly collapsed tokens apart (chaos side), < 0: it collapses them
  further (order side).
- gradient exponent of the whole stack: lambda_g = (1/L) log(|J^T R|^2 / |R|^2)
  (geometry.gradient_exponent), the per-block growth of a random backpropagated signal.

Both vanish at the edge of chaos (an identity stack gives exactly 0 for both).
`input_std` scales X (1: unit-variance coordinates, as in Cowsik et al.; the model's own
embedding has std `model.init_std`): for pre-norm rules the ratio of update to stream, and
so both exponents, depend on it.
"""

from __future__ import annotations

import json
import sys

import torch

from megatron_mgt import geometry
from megatron_mgt.config import Config, ModelConfig, load_config
from megatron_mgt.model import Transformer


def stack_functions(model: Transformer):
    """(per-block functions, whole-stack function) on collapsed [B, T, d] streams."""
    hooks, cfg = model.rule_type, model.cfg
    blocks = list(model.layers.values())

    def one(block):
        return lambda x: hooks.collapse(block(hooks.expand(x, cfg)), cfg)

    def stack(x: torch.Tensor) -> torch.Tensor:
        x = hooks.expand(x, cfg)
        for block in blocks:
            x = block(x)
        return hooks.collapse(x, cfg)

    return [one(b) for b in blocks], stack


def signal_propagation(
    cfg: ModelConfig,
    batch: int = 4,
    seq_len: int = 32,
    rho: float = 0.99,
    input_std: float = 1.0,
    seed: int = 0,
    model: Transformer | None = None,
) -> dict:
    """Angle exponents (per block and mean) and the gradient exponent of the stack of
    `model` (default: Transformer(cfg) initialised under torch.manual_seed(seed)), in fp32."""
    if model is None:
        torch.manual_seed(seed)
        model = Transformer(cfg)
    model = model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    x = input_std * geometry.collapsed_tokens(batch, seq_len, cfg.d_model, rho, gen)
    blocks, stack = stack_functions(model)
    per_block = [geometry.angle_exponent(fn, x) for fn in blocks]
    lam_g = geometry.gradient_exponent(stack, x, len(blocks), gen)
    return {
        "residual": cfg.residual,
        "n_layers": len(blocks),
        "rho": rho,
        "input_std": input_std,
        "angle_exponent": sum(per_block) / len(per_block),
        "angle_exponent_per_block": per_block,
        "gradient_exponent": lam_g,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    preset, overrides = (None, args) if not args or "=" in args[0] else (args[0], args[1:])
    cfg: Config = load_config(preset, overrides)
    print(json.dumps(signal_propagation(cfg.model, seq_len=min(cfg.data.seq_len, cfg.model.max_seq_len), seed=cfg.train.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
