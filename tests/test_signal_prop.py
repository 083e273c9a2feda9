"""Signal propagation at init (spec 3.7): angle and gradient exponents of any variant."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from megatron_mgt.config import RESIDUALS
from megatron_mgt.model import Transformer
from megatron_mgt.signal_prop import main, signal_propagation


def test_preln_with_zeroed_sublayers_is_the_edge_of_chaos():
    """F = 0 makes every preln block the identity: both exponents are exactly 0."""
    cfg = tiny_config("preln", n_layers=3)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for block in model.layers.values():
            block.attn.out.weight.zero_()
            block.mlp.down.weight.zero_()
    out = signal_propagation(cfg, batch=2, seq_len=16, model=model)
    assert out["angle_exponent_per_block"] == [0.0] * cfg.n_layers
    assert out["angle_exponent"] == 0.0 and out["gradient_exponent"] == 0.0


def test_larger_init_and_depth_give_larger_gradient_exponent():
    """preln without depth scaling: a larger init std writes larger updates, so a random
    backpropagated signal grows faster per block; a deeper stack grows it more in total
    (L lambda_g), though the per-block rate falls as the stream's norm grows."""
    lam = {
        std: signal_propagation(tiny_config("preln", 4, init_std=std, scale_init_by_depth=False), batch=2, seq_len=16)["gradient_exponent"]
        for std in (0.02, 0.2, 1.0)
    }
    assert abs(lam[0.02]) < 0.01 < lam[0.2] < lam[1.0]
    deep = signal_propagation(tiny_config("preln", 12, init_std=0.2, scale_init_by_depth=False), batch=2, seq_len=16)
    assert 12 * deep["gradient_exponent"] > 4 * lam[0.2]


def test_ddl_erasure_gives_the_predicted_negative_gradient_exponent():
    """ddl at init: beta = beta_init, W_beta = 0 and V_raw tiny (init 0.02), so each sublayer is
    close to X -> (1 - alpha beta) X and lambda_g ~ 2 sublayers x 2 log(1 - alpha beta)."""
    out = signal_propagation(tiny_config("ddl", n_layers=3), batch=2, seq_len=16)
    assert out["gradient_exponent"] == pytest.approx(4 * math.log(1 - 0.1 * 0.1), abs=0.003)


@pytest.mark.parametrize("residual", RESIDUALS)
def test_runs_for_every_variant(residual):
    out = signal_propagation(tiny_config(residual, n_layers=3), batch=2, seq_len=16)
    assert out["residual"] == residual and out["n_layers"] == 3
    assert len(out["angle_exponent_per_block"]) == 3
    assert all(math.isfinite(v) for v in out["angle_exponent_per_block"])
    assert out["angle_exponent"] == pytest.approx(sum(out["angle_exponent_per_block"]) / 3)
    assert math.isfinite(out["gradient_exponent"])


def test_cli_prints_json(capsys):
    assert (
        main(["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "data.seq_len=16", "model.max_seq_len=16", "model.vocab_size=64"])
        == 0
    )
    assert '"gradient_exponent"' in capsys.readouterr().out
