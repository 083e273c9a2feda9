"""mgt-generate: the KV cache changes nothing, sampling is seeded, top-k / top-p filter as written."""

from __future__ import annotations

import pytest
import torch

from megatron_mgt.config import RESIDUALS, ModelConfig
from megatron_mgt.generate import filter_logits, generate, main
from megatron_mgt.model import Transformer
from tests.test_export import TEXT, make_run

V = 97


def noisy_model(residual: str, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=2, max_seq_len=48, residual=residual, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


CONTEXT = [2, 17, 5, 33, 8]


@pytest.mark.parametrize("residual", RESIDUALS)
def test_cached_forward_equals_full_forward(residual):
    model = noisy_model(residual)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))
    full = model(ids)
    cache = model.new_cache()
    steps = (
        [model(ids[:, :7], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(7, 17)] + [model(ids[:, 17:], cache=cache)]
    )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache[0].length == 20


@pytest.mark.parametrize("residual", RESIDUALS)
def test_cached_and_uncached_generation_give_the_same_tokens(residual):
    model = noisy_model(residual)
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 3}):
        cached = generate(model, CONTEXT, 30, use_cache=True, **kw)
        assert cached == generate(model, CONTEXT, 30, use_cache=False, **kw)
        assert len(cached) == 30


def test_seed_top_k_one_and_limits():
    model = noisy_model("mgt")
    greedy = generate(model, CONTEXT, 20, temperature=0.0)
    assert generate(model, CONTEXT, 20, temperature=1.3, top_k=1, seed=5) == greedy
    assert generate(model, CONTEXT, 20, temperature=1.0, seed=1) == generate(model, CONTEXT, 20, temperature=1.0, seed=1)
    assert generate(model, CONTEXT, 20, temperature=1.0, seed=1) != generate(model, CONTEXT, 20, temperature=1.0, seed=2)
    # EOS stops (and is not returned); max_seq_len bounds the context
    sampled = generate(model, CONTEXT, 20, temperature=1.0, seed=1)
    k = next(i for i in range(1, len(sampled)) if sampled[i] not in sampled[:i])
    assert generate(model, CONTEXT, 20, temperature=1.0, seed=1, eos_id=sampled[k]) == sampled[:k]
    assert len(generate(model, CONTEXT, 1000, temperature=0.0)) == model.cfg.max_seq_len - len(CONTEXT)


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    inf = float("-inf")
    assert filter_logits(logits, top_k=2).isinf().tolist() == [[False, True, False, True]]
    # nucleus: 0.5 alone is < 0.7, 0.5 + 0.3 reaches it -> keep {0, 2}
    assert filter_logits(logits, top_p=0.7).isinf().tolist() == [[False, True, False, True]]
    assert filter_logits(logits, top_p=0.8).isinf().tolist() == [[False, True, False, True]]
    assert filter_logits(logits, top_p=0.81).isinf().tolist() == [[False, True, False, False]]
    assert filter_logits(logits, top_p=0.1).tolist()[0][1:] == [inf, inf, inf]  # the top token always stays
    assert torch.equal(filter_logits(logits), logits)


def test_command_line_samples_with_the_runs_tokenizer(tmp_path, capsys):
    from data_prep.tokenizer import train_tokenizer

    train_tokenizer([TEXT * 3, TEXT.upper() * 3], tmp_path / "tok", 320)
    make_run(tmp_path / "run", "model.residual=mgt", tokenizer=tmp_path / "tok.model", vocab=320)
    args = [str(tmp_path / "run"), "It was", "--max-new-tokens", "12", "--seed", "3", "--top-k", "50", "--top-p", "0.95"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("It was") and len(first) > len("It was\n")
    assert main([*args, "--no-cache"]) == 0 and capsys.readouterr().out == first
    assert main([str(tmp_path / "run"), "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
