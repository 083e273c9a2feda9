"""model.norm: one rule (model/norm.py) for every norm of the model, the pipeline's final stage included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron_mgt.config import ConfigError, ModelConfig, load_config
from megatron_mgt.engine.pipeline import final_norm_stage, pipe_prefix
from megatron_mgt.engine.replay import replay_init
from megatron_mgt.model import RESIDUAL_RULES, Transformer, lm_loss
from megatron_mgt.model.norm import make_norm, norm_class

NORMS = ("layernorm", "rmsnorm")


def small(residual: str, norm: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=16, residual=residual, norm=norm, **kw)


def test_rmsnorm_and_layernorm_match_their_formulas():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=gen) * 2.5 + 0.7
    w, b = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    rms = make_norm(small("preln", "rmsnorm", norm_eps=1e-3), 32)
    ln = make_norm(small("preln", "layernorm", norm_eps=1e-3), 32)
    with torch.no_grad():
        rms.weight.copy_(w)
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    assert isinstance(rms, nn.RMSNorm) and isinstance(ln, nn.LayerNorm) and {n for n, _ in rms.named_parameters()} == {"weight"}
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3) * w, atol=1e-6, rtol=1e-6)
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(ln(x), centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-3) * w + b, atol=1e-5, rtol=1e-5)


def test_default_is_layernorm_and_unknown_norm_is_a_config_error():
    assert ModelConfig().norm == "layernorm"
    assert load_config(None, ["model.norm=rmsnorm"]).model.norm == "rmsnorm"
    with pytest.raises(ConfigError, match="model.norm"):
        load_config(None, ["model.norm=batchnorm"])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("residual", sorted(RESIDUAL_RULES))
def test_every_norm_follows_model_norm_and_the_model_trains(residual, norm):
    cfg = small(residual, norm)
    torch.manual_seed(0)
    model = Transformer(cfg)
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    per_sublayer = 2 if residual in ("mhc", "mgt") else 1  # pre-norm (or post-norm) + the gate's norm
    assert len(norms) == 2 * cfg.n_layers * per_sublayer + 1
    assert all(type(m) is norm_class(cfg) and m.eps == cfg.norm_eps for m in norms)
    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("norm", NORMS)
def test_pipeline_final_norm_stage_and_replay_build_the_models_norm(norm):
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64", f"model.norm={norm}"]).model
    torch.manual_seed(3)
    reference = Transformer(cfg).state_dict()
    replay = replay_init(cfg, 3, set(range(cfg.n_layers + 3)))
    rebuilt = {pipe_prefix(cfg, layer) + k: v for layer, state in replay.items() for k, v in state.items()}
    assert rebuilt.keys() == reference.keys()
    assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)
    stage, norm_module = final_norm_stage(cfg)(cfg), make_norm(cfg, cfg.d_model)
    assert isinstance(stage, norm_class(cfg)) and stage.state_dict().keys() == norm_module.state_dict().keys()
    x = torch.randn(2, 4, cfg.d_model)
    torch.testing.assert_close(stage(x), norm_module(x), atol=0, rtol=0)
