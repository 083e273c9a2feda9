"""The model family against the spec (MGT.md sections 1-2), equations written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import HEADS, B, D, T, V, make_sublayer, pipeline_stages, randomise_, tiny_config, tokens

from megatron_mgt.config import RESIDUALS, MGTConfig, ModelConfig
from megatron_mgt.model import RESIDUAL_RULES, Transformer, capture_geometry, lm_loss
from megatron_mgt.model.attention import apply_rope, causal_attention, rope_tables
from megatron_mgt.model.residual import DeepNorm, GeometricResidual


def stream(gen: torch.Generator) -> torch.Tensor:
    """A residual stream with non-zero mean and scale, so LN and alpha*X matter."""
    return torch.randn(B, T, D, generator=gen) * 2.5 + 0.7


# --- every variant trains at depth 48 ------------------------------------------------


@pytest.mark.parametrize("residual", RESIDUALS)
def test_depth48_finite_loss_and_every_parameter_gets_gradient(residual):
    torch.manual_seed(0)
    model = Transformer(tiny_config(residual, n_layers=48))
    batch = tokens()
    loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(V)) < 1.5  # near-uniform prediction at init
    loss.backward()
    params = dict(model.named_parameters())
    assert params, "model has no parameters"
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"
    if residual in ("ddl", "mgt"):  # W_beta starts at zero but must still learn
        w_beta = params["layers.0.attn_residual.delta.proj.weight"]
        assert w_beta.abs().max() == 0 and w_beta.grad.abs().max() > 0
        assert "layers.0.attn_residual.delta.alpha" in params
    if residual in ("mhc", "mgt"):
        assert "layers.47.mlp_residual.gate.proj.weight" in params


# --- the geometric update, written out from the spec ---------------------------------


GEOMETRIC_CASES = [
    ("mgt", {}),
    ("mhc", {}),
    ("ddl", {}),
    ("mgt", {"controller_input": "ln"}),
    ("ddl", {"controller_input": "ln"}),
    ("mgt", {"beta_granularity": "token"}),
    ("mgt", {"alpha_mode": "channel"}),
    ("mgt", {"alpha_mode": "fixed"}),
    ("ddl", {"alpha_mode": "channel", "beta_granularity": "token", "controller_input": "ln"}),
]


@pytest.mark.parametrize("residual, knobs", GEOMETRIC_CASES, ids=[f"{r}-{'-'.join(map(str, k.values())) or 'default'}" for r, k in GEOMETRIC_CASES])
def test_geometric_update_matches_spec(residual, knobs):
    gen = torch.Generator().manual_seed(7)
    mgt = MGTConfig(lam=0.8, eps=0.3, beta_init=0.2, alpha_init=0.1, **knobs)
    cfg = tiny_config(residual, n_layers=4, mgt=mgt)
    rule = RESIDUAL_RULES[residual](cfg)
    assert isinstance(rule, GeometricResidual)
    has_gate, has_delta = residual in ("mhc", "mgt"), residual in ("ddl", "mgt")
    assert (rule.gate is not None, rule.delta is not None) == (has_gate, has_delta)

    # non-trivial weights everywhere, including the LayerNorm affines
    randomise_(rule.norm.weight, gen, 0.5, 1.0)
    randomise_(rule.norm.bias, gen, 0.3)
    if has_gate:
        randomise_(rule.gate.proj.weight, gen, 0.3)
        randomise_(rule.gate.norm.weight, gen, 0.5, 1.0)
        randomise_(rule.gate.norm.bias, gen, 0.3)
    if has_delta:
        randomise_(rule.delta.proj.weight, gen, 0.2)
        randomise_(rule.delta.proj.bias, gen, 0.5)
        randomise_(rule.delta.alpha, gen, 0.3, 0.2)
        names = dict(rule.named_parameters())
        assert ("delta.alpha" in names) == (mgt.alpha_mode != "fixed")
        assert rule.delta.alpha.numel() == (D if mgt.alpha_mode == "channel" else 1)
        assert rule.delta.proj.weight.shape == ((D if mgt.beta_granularity == "channel" else 1), D)

    x = stream(gen)
    sublayer, seen = make_sublayer(gen)
    got = rule(x, sublayer)

    eps = cfg.norm_eps
    h = F.layer_norm(x, (D,), rule.norm.weight, rule.norm.bias, eps)  # H = LN(X)
    v = sublayer(h)  # V_raw = F(H)
    torch.testing.assert_close(seen[0], h, atol=1e-6, rtol=0)  # F was fed LN(X)
    c = h if mgt.controller_input == "ln" else x
    if has_gate:  # V_mHC = V_raw * sigmoid(LN(C W_gate))
        v = v * torch.sigmoid(F.layer_norm(c @ rule.gate.proj.weight.T, (D,), rule.gate.norm.weight, rule.gate.norm.bias, eps))
    if has_delta:  # beta = lam tanh(C W_beta + b_beta) + eps;  X + beta (V - alpha X)
        beta = mgt.lam * torch.tanh(c @ rule.delta.proj.weight.T + rule.delta.proj.bias) + mgt.eps
        alpha = rule.delta.alpha
        want = x + beta * (v - alpha * x)
        # the spec's rewritten form: (1 - alpha beta) X + beta V
        torch.testing.assert_close(want, (1 - alpha * beta) * x + beta * v, atol=1e-5, rtol=1e-5)
    else:
        want = x + v
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the weights were not trivial: the update moved X
    assert (got - x).abs().max() > 1e-2


def test_preln_postln_deepnorm_formulas():
    gen = torch.Generator().manual_seed(3)
    x = stream(gen)
    sublayer, _ = make_sublayer(gen)
    for name in ("preln", "postln", "deepnorm"):
        cfg = tiny_config(name, n_layers=6)
        rule = RESIDUAL_RULES[name](cfg)
        randomise_(rule.norm.weight, gen, 0.5, 1.0)
        randomise_(rule.norm.bias, gen, 0.3)
        ln = lambda z: F.layer_norm(z, (D,), rule.norm.weight, rule.norm.bias, cfg.norm_eps)  # noqa: E731, B023 (used in this iteration)
        if name == "preln":
            want = x + sublayer(ln(x))
        elif name == "postln":
            want = ln(x + sublayer(x))
        else:
            want = ln((2 * 6) ** 0.25 * x + sublayer(x))
        torch.testing.assert_close(rule(x, sublayer), want, atol=1e-6, rtol=0, msg=name)


# --- beta: initial value and range ----------------------------------------------------


@pytest.mark.parametrize("residual", ["ddl", "mgt"])
@pytest.mark.parametrize("granularity", ["channel", "token"])
def test_beta_at_init_equals_beta_init(residual, granularity):
    torch.manual_seed(1)
    mgt = MGTConfig(lam=0.5, eps=0.1, beta_init=0.37, beta_granularity=granularity)
    model = Transformer(tiny_config(residual, n_layers=3, mgt=mgt))
    out = capture_geometry(model, tokens()[:, :-1])
    betas = [s["beta"] for s in out["sublayers"].values()]
    assert len(betas) == 6
    for beta in betas:
        torch.testing.assert_close(beta, torch.full_like(beta, 0.37), atol=1e-6, rtol=0)


@pytest.mark.parametrize("lam, eps", [(1.0, 0.0), (0.6, 0.5), (0.3, -0.2)])
def test_beta_stays_inside_eps_pm_lam(lam, eps):
    gen = torch.Generator().manual_seed(5)
    rule = RESIDUAL_RULES["mgt"](tiny_config("mgt", n_layers=4, mgt=MGTConfig(lam=lam, eps=eps, beta_init=eps)))
    randomise_(rule.delta.proj.weight, gen, 3.0)  # large weights saturate tanh both ways
    randomise_(rule.delta.proj.bias, gen, 3.0)
    x = torch.randn(8, T, D, generator=gen) * 10
    beta = rule.delta.beta(x).detach()
    assert beta.min() >= eps - lam - 1e-6 and beta.max() <= eps + lam + 1e-6
    # it reaches both ends: the bounds are the real range, not a narrower one
    assert beta.min() < eps - lam + 1e-3 and beta.max() > eps + lam - 1e-3
    if eps - lam < 0:
        assert (beta < 0).any()  # negative beta is allowed by this form


# --- DeepNorm constants and init ------------------------------------------------------


def test_deepnorm_constants_and_init_scaling():
    layers, width = 6, 128
    cfg = ModelConfig(vocab_size=V, d_model=width, n_heads=4, n_layers=layers, max_seq_len=T, residual="deepnorm", init_std=0.02)
    torch.manual_seed(2)
    model = Transformer(cfg)
    a, b = (2 * layers) ** 0.25, (8 * layers) ** -0.25
    for _, rule in model.residual_rules():
        assert isinstance(rule, DeepNorm)
        assert rule.alpha == pytest.approx(a) and rule.init_gain == pytest.approx(b)

    def pooled_std(pick) -> float:
        return torch.cat([pick(blk).detach().flatten() for blk in model.layers.values()]).std().item()

    d = width
    stds = {
        "q": pooled_std(lambda blk: blk.attn.qkv.weight[:d]),
        "k": pooled_std(lambda blk: blk.attn.qkv.weight[d : 2 * d]),
        "v": pooled_std(lambda blk: blk.attn.qkv.weight[2 * d :]),
        "o": pooled_std(lambda blk: blk.attn.out.weight),
        "ffn_gate": pooled_std(lambda blk: blk.mlp.gate.weight),
        "ffn_up": pooled_std(lambda blk: blk.mlp.up.weight),
        "ffn_down": pooled_std(lambda blk: blk.mlp.down.weight),
    }
    # >= 6 * 128 * 128 samples each: relative sampling error of the std ~ 0.3%
    for name, want in [("q", 0.02), ("k", 0.02)] + [(n, 0.02 * b) for n in ("v", "o", "ffn_gate", "ffn_up", "ffn_down")]:
        assert stds[name] == pytest.approx(want, rel=0.03), (name, stds[name], want)


def test_preln_output_projections_depth_scaled():
    layers, width = 6, 128
    cfg = ModelConfig(vocab_size=V, d_model=width, n_heads=4, n_layers=layers, max_seq_len=T, residual="preln")
    torch.manual_seed(2)
    model = Transformer(cfg)
    out = torch.cat([blk.attn.out.weight.detach().flatten() for blk in model.layers.values()]).std().item()
    v = torch.cat([blk.attn.qkv.weight[2 * width :].detach().flatten() for blk in model.layers.values()]).std().item()
    assert out == pytest.approx(0.02 / math.sqrt(2 * layers), rel=0.03)
    assert v == pytest.approx(0.02, rel=0.03)


# --- attention: RoPE and causality ----------------------------------------------------


def test_rope_relative_position_and_norm():
    gen = torch.Generator().manual_seed(11)
    n, head_dim = 32, 16
    cos, sin = rope_tables(n, head_dim, 10000.0, torch.device("cpu"))
    q = torch.randn(head_dim, generator=gen)
    k = torch.randn(head_dim, generator=gen)
    # the same q (k) placed at every position: [1, T, 1, D]
    rq = apply_rope(q.expand(1, n, 1, head_dim).contiguous(), cos, sin)[0, :, 0]
    rk = apply_rope(k.expand(1, n, 1, head_dim).contiguous(), cos, sin)[0, :, 0]
    scores = rq @ rk.T  # scores[m, j] = <R_m q, R_j k>
    for offset in (-7, 0, 3, 12):
        diag = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diag, torch.full_like(diag, diag[0].item()), atol=1e-4, rtol=1e-5)
    assert abs(scores[0, 0] - scores[0, 5]) > 1e-3  # but it does depend on the difference
    torch.testing.assert_close(rq[0], q)  # position 0: no rotation
    # rotation preserves norms, per head vector
    x = torch.randn(2, n, 3, head_dim, generator=gen)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual", RESIDUALS)
def test_causal_future_token_does_not_change_past_logits(residual):
    torch.manual_seed(4)
    model = Transformer(tiny_config(residual, n_layers=3)).eval()
    a = tokens()[:, :-1]
    b = a.clone()
    j = 9
    b[:, j] = (a[:, j] + 1) % V
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :j], lb[:, :j], atol=0, rtol=0)
    assert (la[:, j:] - lb[:, j:]).abs().max() > 1e-6  # the changed token does matter


def test_causal_attention_sdpa_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, T, HEADS, 8, generator=gen) for _ in range(3))
    out = causal_attention(q, k, v, kernel="sdpa")
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_flash_kernel_refused_where_unusable():
    q = torch.randn(1, T, HEADS, 8)
    with pytest.raises(RuntimeError, match="flash"):
        causal_attention(q, q, q, kernel="flash")


def test_flash_matches_sdpa():
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("flash-attn needs CUDA")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    flash = causal_attention(q, k, v, kernel="flash")
    sdpa = causal_attention(q, k, v, kernel="sdpa")
    assert flash.dtype == sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


# --- embeddings, pipeline stages, geometry capture ------------------------------------


def test_tied_embeddings_share_storage_untied_do_not():
    tied = Transformer(tiny_config("mgt", n_layers=4, tie_embeddings=True))
    assert tied.head.weight is tied.embed.weight
    assert tied.head.weight.data_ptr() == tied.embed.weight.data_ptr()
    untied = Transformer(tiny_config("mgt", n_layers=4, tie_embeddings=False))
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    with torch.no_grad():
        tied.embed.weight[0, 0] = 123.0
    assert tied.head.weight[0, 0].item() == 123.0


@pytest.mark.parametrize("residual", ["mgt", "mhc_nstream"])
def test_without_final_norm_the_head_reads_the_last_stream(residual):
    """model.final_norm=false (an open knob of the spec): no LayerNorm before the head."""
    model = Transformer(tiny_config(residual, n_layers=4, final_norm=False)).eval()
    assert not any(k.startswith("norm.") for k in model.state_dict())
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    hidden: list[torch.Tensor] = []
    logits = model(tokens, hidden=hidden)
    assert torch.allclose(logits, model.head(hidden[-1]), atol=1e-6)
    with_norm = Transformer(tiny_config(residual, n_layers=4)).eval()
    assert torch.allclose(with_norm(tokens, hidden=(h := [])), with_norm.head(with_norm.norm(h[-1])), atol=1e-6)
    assert torch.isfinite(lm_loss(logits, tokens)).item()


@pytest.mark.parametrize("residual, tie", [("mgt", True), ("preln", False), ("postln", True)])
def test_pipeline_stages_compose_to_full_model(residual, tie):
    torch.manual_seed(8)
    layers, k = 5, 2
    model = Transformer(tiny_config(residual, n_layers=layers, tie_embeddings=tie)).eval()
    first, last = pipeline_stages(model, k)
    x = tokens()[:, :-1]
    with torch.no_grad():
        full = model(x)
        mid = first(x)
        staged = last(mid)
    assert mid.shape == (B, T, D)
    assert list(last.layers.keys()) == [str(i) for i in range(k, layers)]
    torch.testing.assert_close(staged, full, atol=0, rtol=0)
    # parameter names are stable across the cut
    full_state = model.state_dict()
    for stage in (first, last):
        for name, value in stage.state_dict().items():
            assert torch.equal(full_state[name], value), name


@pytest.mark.parametrize(
    "residual, granularity",
    [("preln", "channel"), ("mhc", "channel"), ("ddl", "channel"), ("mgt", "channel"), ("mgt", "token"), ("ddl", "token")],
)
def test_capture_geometry_shapes_and_cleanup(residual, granularity):
    torch.manual_seed(9)
    layers = 3
    model = Transformer(tiny_config(residual, n_layers=layers, mgt=MGTConfig(beta_granularity=granularity)))
    x = tokens()[:, :-1]
    out = capture_geometry(model, x)
    hidden = out["hidden"]
    assert len(hidden) == layers + 1
    assert all(h.shape == (B, T, D) for h in hidden)
    torch.testing.assert_close(hidden[0], model.embed(x))
    torch.testing.assert_close(model.head(model.norm(hidden[-1])), out["logits"])
    assert list(out["sublayers"]) == [f"layers.{i}.{s}" for i in range(layers) for s in ("attn", "mlp")]
    for stats in out["sublayers"].values():
        assert stats["update_ratio"].shape == (B,)
        if residual in ("ddl", "mgt"):
            width = D if granularity == "channel" else 1
            assert stats["beta"].shape == (B, T, width)
            assert not stats["beta"].requires_grad
        else:
            assert "beta" not in stats
    for _, rule in model.residual_rules():
        assert rule.capture is False
        assert rule.captured == {}
    # and a later ordinary forward captures nothing
    model(x)
    assert all(rule.captured == {} for _, rule in model.residual_rules())
