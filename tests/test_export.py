"""mgt-export / mgt-import: every residual rule loads in transformers with the project's logits
(fp32, small random models), Llama / StableLM come in and go out unchanged."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

from megatron_mgt.checkpoint import save_checkpoint
from megatron_mgt.config import RESIDUALS, Config, load_config, to_dict
from megatron_mgt.engine.single import SingleEngine
from megatron_mgt.export import MODELING_FILE, TOKENIZER_PROBES, export_hf, export_main, import_hf, import_main, run_state
from megatron_mgt.model import Transformer

transformers = pytest.importorskip("transformers")
VOCAB = 97
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness,\n"
    "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of "
    "Darkness, it was the spring of hope, it was the winter of despair. 1775: caf\u00e9 \u65e5\u672c\n"
)


def make_run(root: Path, *overrides: str, tokenizer: Path | None = None, vocab: int = VOCAB) -> tuple[Config, Transformer]:
    """A run directory (config.yaml + one single-layout checkpoint) of a small model whose
    weights are its init plus noise, so norms, gates and controllers are all non-trivial."""
    base = [
        f"model.vocab_size={vocab}",
        "model.d_model=32",
        "model.n_heads=2",
        "model.n_layers=3",
        "model.max_seq_len=32",
        "data.seq_len=32",
    ]
    cfg = load_config(None, [*base, f"train.run_dir={root}", *([f"data.tokenizer={tokenizer}"] if tokenizer else []), *overrides])
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    save_checkpoint(
        root / "checkpoints", 5, lambda d: SingleEngine.write_weights(model.state_dict(), d, cfg.model), {"step": 5, "config": to_dict(cfg)}
    )
    return cfg, model


def load_hf(directory: Path, remote: bool):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from data_prep.tokenizer import train_tokenizer

    prefix = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([TEXT * 3, TEXT.upper() * 3], prefix, 320)
    return Path(f"{prefix}.model")


CASES = [(r, n) for n in ("layernorm", "rmsnorm") for r in RESIDUALS]


@pytest.mark.parametrize(("residual", "norm"), CASES)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, residual, norm):
    _, model = make_run(tmp_path / "run", f"model.residual={residual}", f"model.norm={norm}")
    info = export_hf(tmp_path / "run", tmp_path / "hf")
    native = residual == "preln"
    assert info["remote_code"] is not native
    assert info["architecture"] == (
        {"rmsnorm": "LlamaForCausalLM", "layernorm": "StableLmForCausalLM"}[norm] if native else "MGTForCausalLM"
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [info["architecture"]]
    assert (tmp_path / "hf" / "modeling_mgt.py").is_file() is not native and ("auto_map" in config) is not native
    hf = load_hf(tmp_path / "hf", remote=not native)
    assert type(hf).__name__ == info["architecture"]
    with torch.no_grad():
        diff = (model(TOKENS) - hf(TOKENS).logits).abs().max().item()
    assert diff <= 1e-5, f"{residual}/{norm}: max |logit difference| {diff:.3e}"


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.residual=preln", "model.tie_embeddings=false"),
        ("model.residual=preln", "model.mlp=gelu"),
        ("model.residual=preln", "model.final_norm=false"),
        ("model.residual=mgt", "model.mgt.alpha_mode=fixed", "model.mgt.controller_input=ln"),
        ("model.residual=mgt", "model.tie_embeddings=false", "model.mgt.beta_granularity=token", "model.mgt.alpha_mode=channel"),
    ],
)
def test_export_variants(tmp_path, overrides):
    cfg, model = make_run(tmp_path / "run", *overrides)
    info = export_hf(tmp_path / "run", tmp_path / "hf")
    assert info["remote_code"] is not (cfg.model.residual == "preln" and cfg.model.mlp == "swiglu" and cfg.model.final_norm)
    hf = load_hf(tmp_path / "hf", remote=info["remote_code"])
    with torch.no_grad():
        assert (model(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 1e-5
    # and back: the same state dict
    ckpt = import_hf(tmp_path / "hf", tmp_path / "back")
    _, _, state = run_state(tmp_path / "back", ckpt)
    reference = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)


def test_remote_code_imports_only_torch_and_transformers():
    tree = ast.parse(MODELING_FILE.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "torch", "transformers"}, imported


def test_hf_generate_on_remote_code(tmp_path):
    _, model = make_run(tmp_path / "run", "model.residual=mgt")
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = load_hf(tmp_path / "hf", remote=True)
    ids = TOKENS[:1, :5]
    x = ids
    for _ in range(6):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    for use_cache in (True, False):  # no cache in the remote code: each step reads the whole sequence
        assert torch.equal(hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0), x)


@pytest.mark.parametrize("residual", ["preln", "mgt"])
def test_tokenizer_ships_and_autotokenizer_encodes_like_sentencepiece(tmp_path, tokenizer, residual):
    from data_prep.tokenizer import Tokenizer

    make_run(tmp_path / "run", f"model.residual={residual}", tokenizer=tokenizer, vocab=320)
    info = export_hf(tmp_path / "run", tmp_path / "hf")
    assert info["tokenizer_mismatch"] == []
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    sp = Tokenizer(tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=info["remote_code"])
    for text in (*TOKENIZER_PROBES, TEXT, "  two  spaces\n\nand a tab\t."):
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text) and hf.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == text  # the newline piece is not a special token
    assert hf("x").input_ids == sp.encode("x")  # no BOS / EOS added
    assert hf.eos_token_id == sp.eos_id == json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"]
    # mgt-import keeps the sentencepiece model for mgt-generate
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert Path(load_config(tmp_path / "back" / "config.yaml").data.tokenizer).read_bytes() == tokenizer.read_bytes()


# --- mgt-import ---------------------------------------------------------------------------


def hf_model(kind: str, tmp_path: Path, **kw):
    """A small random Llama / StableLM saved with save_pretrained; norms perturbed off 1/0."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(**{**common, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, **kw})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.StableLmConfig(**{**common, "partial_rotary_factor": 1.0, "tie_word_embeddings": True, **kw})
        model = transformers.StableLmForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    model.eval().save_pretrained(tmp_path / kind)
    return model


@pytest.mark.parametrize("kind", ["llama", "stablelm"])
def test_import_gives_the_models_logits_and_exports_back(tmp_path, kind):
    hf = hf_model(kind, tmp_path, rope_theta=5e5)
    ckpt = import_hf(tmp_path / kind, tmp_path / "run")
    cfg, _, state = run_state(tmp_path / "run")
    assert (cfg.model.residual, cfg.model.norm, cfg.model.rope_theta) == ("preln", "rmsnorm" if kind == "llama" else "layernorm", 5e5)
    model = Transformer(cfg.model).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        assert (model(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 1e-5
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert trainer["step"] == 0 and trainer["config"]["model"] == to_dict(cfg)["model"]
    export_hf(tmp_path / "run", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["architectures"] == [type(hf).__name__]


def test_imported_run_resumes_training(tmp_path, zipf_shards):
    from megatron_mgt.train import train

    hf_model("llama", tmp_path, vocab_size=256)
    ckpt = import_hf(tmp_path / "llama", tmp_path / "run")
    train_prefix, valid_prefix = zipf_shards
    overrides = [
        f"data.train_prefix={train_prefix}",
        f"data.valid_prefix={valid_prefix}",
        "data.seq_len=32",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.save_every=0",
        f"train.resume={ckpt}",
        f"train.run_dir={tmp_path / 'continued'}",
        "log.wandb=disabled",
        "log.progress=false",
        "log.geometry_every=0",
    ]
    result = train(load_config(tmp_path / "run" / "config.yaml", overrides))
    assert result.status == "finished" and result.step == 2
    events = [json.loads(line) for line in (tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resumed" for e in events)


@pytest.mark.parametrize(
    ("kind", "kw", "message"),
    [
        ("llama", {"num_key_value_heads": 1}, "num_key_value_heads=1: grouped-query"),
        ("llama", {"attention_bias": True}, "attention_bias=True"),
        ("llama", {"mlp_bias": True}, "mlp_bias=True"),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("stablelm", {"partial_rotary_factor": 0.25}, "partial_rotary_factor=0.25"),
        ("stablelm", {"use_qkv_bias": True}, "use_qkv_bias=True"),
        ("stablelm", {"use_parallel_residual": True}, "use_parallel_residual=True"),
    ],
)
def test_import_refuses_what_the_model_does_not_have(tmp_path, kind, kw, message):
    hf_model(kind, tmp_path, **kw)
    with pytest.raises(ValueError, match=message):
        import_hf(tmp_path / kind, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_command_lines(tmp_path, capsys):
    make_run(tmp_path / "run", "model.residual=ddl")
    assert export_main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert import_main([str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "checkpoints" / "latest").read_text().strip() == "step_00000000"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert import_main([str(tmp_path / "other"), "--out", str(tmp_path / "x")]) == 2
    assert "model_type='gpt2' is not imported" in capsys.readouterr().err
