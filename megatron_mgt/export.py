"""Trained models leave the project (mgt-export) and published ones come in (mgt-import).

    mgt-export RUN --format hf --out DIR [--checkpoint CKPT] [--tokenizer TOK.model]
    mgt-import HF_DIR --out RUN

mgt-export writes a directory that transformers loads with `from_pretrained`: safetensors
weights, config.json and the run's sentencepiece tokenizer (tokenizer.model, plus the
tokenizer.json / tokenizer_config.json of a LlamaTokenizer that AutoTokenizer loads). A
pre-LN model with SwiGLU and a final norm is a native architecture, exactly:

    model.norm=rmsnorm    LlamaForCausalLM      RMSNorm, RoPE on channel halves, no biases, no GQA
    model.norm=layernorm  StableLmForCausalLM   the same with LayerNorm (full rotary, no qkv bias)

Every other model (the other residual rules, GELU, no final norm) ships the self-contained
`modeling_mgt.py` (megatron_mgt/hf_modeling, no import of megatron_mgt) with `auto_map` in
config.json: load it with `trust_remote_code=True`.

mgt-import reads a LlamaForCausalLM, StableLmForCausalLM or mgt-export directory (safetensors)
and writes a run directory: RUN/config.yaml and RUN/checkpoints/step_00000000/ (model.pt,
trainer.pt, the `latest` pointer), which mgt-eval evaluates and `train.resume=` continues;
features the project's model does not have (GQA, biases, partial rotary, rope scaling, ...)
are errors that name the config.json key. transformers and safetensors are imported on use
(`pip install -e .[dev]` or `pip install transformers`). docs/EXPORT.md has the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from megatron_mgt.checkpoint import find_checkpoint, rng_state, save_checkpoint
from megatron_mgt.config import Config, ConfigError, ModelConfig, load_config, merge, to_dict, validate
from megatron_mgt.convert import check_state
from megatron_mgt.engine import read_weights
from megatron_mgt.engine.base import TRAINER_STATE
from megatron_mgt.engine.single import SingleEngine
from megatron_mgt.hf_modeling import MODELING_FILE

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_MODEL = "tokenizer.model"
NATIVE = {"rmsnorm": ("llama", "LlamaForCausalLM"), "layernorm": ("stablelm", "StableLmForCausalLM")}
REMOTE_AUTO_MAP = {"AutoConfig": "modeling_mgt.MGTConfig", "AutoModelForCausalLM": "modeling_mgt.MGTForCausalLM"}
# texts the exported tokenizer must encode as sentencepiece does (whitespace runs, digits, bytes)
TOKENIZER_PROBES = (
    "To be, or not to be: that is the question.\n\n  Whether 'tis nobler",
    " x\ty  12345 3.14\n",
    "caf\u00e9 \u65e5\u672c \U0001f3ad",
)


def require(package: str):
    """Import transformers or safetensors, or say what to install."""
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"{package} is needed for export/import: pip install -e .[dev] (or pip install transformers, which brings safetensors)"
        ) from err


# --- the run's weights ------------------------------------------------------------------


def run_state(run_dir: Path, checkpoint: Path | None = None) -> tuple[Config, Path, dict[str, torch.Tensor]]:
    """(config, checkpoint dir, single-engine state dict) of RUN: RUN/config.yaml and the
    `latest` checkpoint (or `checkpoint`) in any engine's layout; head.weight is embed.weight
    when the embeddings are tied."""
    cfg = load_config(run_dir / "config.yaml")
    checkpoint = checkpoint or find_checkpoint(run_dir / "checkpoints", "auto")
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no complete checkpoint (pass --checkpoint)")
    state = read_weights(checkpoint, cfg.model)  # the one read of a run's weights (any engine's layout)
    check_state(state, cfg.model)
    if cfg.model.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return cfg, checkpoint, state


# --- native architectures (pre-LN) ------------------------------------------------------


def native_architecture(cfg: ModelConfig) -> tuple[str, str] | None:
    """(model_type, class) of the transformers architecture that equals the model, or None."""
    if cfg.residual == "preln" and cfg.mlp == "swiglu" and cfg.final_norm:
        return NATIVE[cfg.norm]
    return None


def native_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(project key, transformers key) of every tensor but the fused qkv and the tied head."""
    names = [("embed.weight", "model.embed_tokens.weight")]
    affine = ("weight", "bias") if cfg.norm == "layernorm" else ("weight",)
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names.append((ours + "attn.out.weight", theirs + "self_attn.o_proj.weight"))
        names += [(ours + f"mlp.{p}.weight", theirs + f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")]
        for sub, norm in (("attn", "input_layernorm"), ("mlp", "post_attention_layernorm")):
            names += [(ours + f"{sub}_residual.norm.{a}", theirs + f"{norm}.{a}") for a in affine]
    names += [(f"norm.{a}", f"model.norm.{a}") for a in affine]
    if not cfg.tie_embeddings:
        names.append(("head.weight", "lm_head.weight"))
    return names


def to_native(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {theirs: state[ours] for ours, theirs in native_names(cfg)}
    for i in range(cfg.n_layers):
        q, k, v = state[f"layers.{i}.attn.qkv.weight"].chunk(3, dim=0)
        out.update({f"model.layers.{i}.self_attn.{p}_proj.weight": w for p, w in zip("qkv", (q, k, v), strict=True)})
    return out


def from_native(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: Path) -> dict[str, torch.Tensor]:
    names = native_names(cfg)
    fused = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(cfg.n_layers) for p in "qkv"]
    expected = {theirs for _, theirs in names} | set(fused)
    extra = sorted(set(tensors) - expected - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    missing = sorted(expected - set(tensors))
    if extra or missing:
        raise ValueError(f"{source}: tensors the project's model does not map: unexpected {extra[:5]}, missing {missing[:5]}")
    state = {ours: tensors[theirs] for ours, theirs in names}
    for i in range(cfg.n_layers):
        state[f"layers.{i}.attn.qkv.weight"] = torch.cat([tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"])
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return state


def native_config(cfg: ModelConfig, special: dict[str, int]):
    """The transformers config of `native_architecture(cfg)`."""
    transformers = require("transformers")
    model_type, arch = native_architecture(cfg)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta,
        **special,
    )
    if model_type == "llama":
        config = transformers.LlamaConfig(rms_norm_eps=cfg.norm_eps, attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim, **common)
    else:
        config = transformers.StableLmConfig(
            layer_norm_eps=cfg.norm_eps,
            partial_rotary_factor=1.0,
            use_qkv_bias=False,
            qk_layernorm=False,
            use_parallel_residual=False,
            **common,
        )
    config.architectures = [arch]
    return config


def native_model_config(config: dict, source: Path) -> ModelConfig:
    """The project's ModelConfig of a Llama or StableLM config.json, or an error naming the
    key of a feature the project's pre-LN model does not have."""
    model_type = config.get("model_type")

    def refuse(key: str, why: str) -> None:
        raise ValueError(f"{source}: {key}={config.get(key)!r}: {why}")

    heads = config["num_attention_heads"]
    if (config.get("num_key_value_heads") or heads) != heads:
        refuse(
            "num_key_value_heads",
            f"grouped-query attention (!= num_attention_heads={heads}); the project's attention has one key/value head per query head",
        )
    if (config.get("head_dim") or config["hidden_size"] // heads) * heads != config["hidden_size"]:
        refuse("head_dim", "head_dim * num_attention_heads != hidden_size")
    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the project's SwiGLU uses silu")
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"{source}: rope scaling ({config.get('rope_scaling') or rope}) is not supported: the project's RoPE is the plain one"
        )
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial}: the project rotates every channel (full rotary)")
    if model_type == "llama":
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key):
                refuse(key, "the project's linear layers have no biases")
        norm, eps = "rmsnorm", config.get("rms_norm_eps", 1e-6)
    else:
        for key, why in (
            ("use_qkv_bias", "the project's linear layers have no biases"),
            ("qk_layernorm", "no q/k norm in the project"),
            ("use_parallel_residual", "the project's block is sequential"),
        ):
            if config.get(key):
                refuse(key, why)
        norm, eps = "layernorm", config.get("layer_norm_eps", 1e-5)
    return ModelConfig(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        d_ff=config["intermediate_size"],
        mlp="swiglu",
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        final_norm=True,
        residual="preln",
        norm=norm,
        norm_eps=float(eps),
    )


# --- remote code (every model) ----------------------------------------------------------

MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


def remote_config(cfg: ModelConfig, special: dict[str, int]) -> dict:
    """config.json of modeling_mgt.MGTConfig: the project's model config, d_ff resolved."""
    fields = {**dataclasses.asdict(cfg), "d_ff": cfg.ffn_dim}
    return {
        "architectures": ["MGTForCausalLM"],
        "auto_map": REMOTE_AUTO_MAP,
        "model_type": "mgt",
        **fields,
        "tie_word_embeddings": cfg.tie_embeddings,
        **special,
    }


def remote_model_config(config: dict, source: Path) -> ModelConfig:
    cfg = ModelConfig()
    try:
        merge(cfg, {key: config[key] for key in MODEL_FIELDS if key in config})
    except ConfigError as err:
        raise ValueError(f"{source}: {err}") from err
    return cfg


# --- tokenizer --------------------------------------------------------------------------


def special_ids(tokenizer: Path | None) -> dict[str, int]:
    if tokenizer is None:
        return {}
    from data_prep.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {k: v for k, v in ids.items() if v >= 0}


def write_tokenizer(tokenizer: Path, out: Path) -> list[str]:
    """tokenizer.model + a LlamaTokenizer (tokenizer.json) converted from it, no prefix space,
    no BOS/EOS added; returns the probe texts the conversion does not encode as sentencepiece
    does (empty: AutoTokenizer and sentencepiece agree)."""
    import sentencepiece as spm

    transformers = require("transformers")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    pieces = {
        name: sp.id_to_piece(i)
        for name, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id()))
        if i >= 0
    }
    settings = {
        "tokenizer_class": "LlamaTokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        **pieces,
    }
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(tokenizer, Path(tmp) / TOKENIZER_MODEL)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
        hf = transformers.AutoTokenizer.from_pretrained(tmp)
    hf.save_pretrained(out)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):  # how it was loaded here, not what it is
        saved.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(saved, indent=2) + "\n")
    shutil.copy2(tokenizer, out / TOKENIZER_MODEL)
    return [text for text in TOKENIZER_PROBES if hf.encode(text, add_special_tokens=False) != sp.encode(text)]


# --- mgt-export -------------------------------------------------------------------------


def export_hf(run_dir: Path, out: Path, checkpoint: Path | None = None, tokenizer: Path | None = None) -> dict:
    """Write RUN's checkpoint as a transformers directory `out` (empty or absent); returns
    {architecture, remote_code, checkpoint, tokenizer, tokenizer_mismatch}."""
    safetensors_torch = require("safetensors.torch")
    cfg, checkpoint, state = run_state(run_dir, checkpoint)
    tokenizer = tokenizer or (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if tokenizer is not None and not tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer} (data.tokenizer of {run_dir}/config.yaml) not found; pass --tokenizer")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty")
    out.mkdir(parents=True, exist_ok=True)
    m, special = cfg.model, special_ids(tokenizer)
    native = native_architecture(m)
    if native is not None:
        tensors = to_native(state, m)
        native_config(m, special).save_pretrained(out)
    else:
        tensors = {k: v for k, v in state.items() if not (m.tie_embeddings and k == "head.weight")}
        (out / "config.json").write_text(json.dumps(remote_config(m, special), indent=2) + "\n")
        shutil.copy2(MODELING_FILE, out / MODELING_FILE.name)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    safetensors_torch.save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    mismatch = write_tokenizer(tokenizer, out) if tokenizer is not None else []
    return {
        "architecture": native[1] if native else "MGTForCausalLM",
        "remote_code": native is None,
        "checkpoint": str(checkpoint),
        "tokenizer": str(tokenizer) if tokenizer else None,
        "tokenizer_mismatch": mismatch,
    }


# --- mgt-import -------------------------------------------------------------------------


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors (or the shards of its index), as fp32."""
    safetensors_torch = require("safetensors.torch")
    if (hf_dir / WEIGHTS_INDEX).is_file():
        files = sorted(set(json.loads((hf_dir / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    elif (hf_dir / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{hf_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (only safetensors weights are read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(safetensors_torch.load_file(str(hf_dir / name)))
    return {k: v.float() for k, v in tensors.items()}


def import_hf(hf_dir: Path, out: Path) -> Path:
    """Write the model of transformers directory `hf_dir` as run directory `out` (empty or
    absent); returns its checkpoint dir."""
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type in ("llama", "stablelm"):
        model_cfg = native_model_config(config, config_file)
        state = from_native(read_safetensors(hf_dir), model_cfg, hf_dir)
    elif model_type == "mgt":
        model_cfg = remote_model_config(config, config_file)
        state = read_safetensors(hf_dir)
        if model_cfg.tie_embeddings:
            state["head.weight"] = state["embed.weight"]
    else:
        raise ValueError(f"{config_file}: model_type={model_type!r} is not imported (llama, stablelm, or an mgt-export directory)")
    check_state(state, model_cfg)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty")
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config(model=model_cfg)
    cfg.data.seq_len = min(cfg.data.seq_len, model_cfg.max_seq_len)
    cfg.train.run_dir = str(out)
    if (hf_dir / TOKENIZER_MODEL).is_file():
        shutil.copy2(hf_dir / TOKENIZER_MODEL, out / TOKENIZER_MODEL)
        cfg.data.tokenizer = str(out / TOKENIZER_MODEL)
    validate(cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    # the checkpoint fixes the model alone: data, batch and seed are the resuming run's own
    # (a resume compares only the keys both configs have, config.resume_changes)
    model_only = {"model": to_dict(cfg)["model"]}
    trainer_state = {
        "step": 0,
        "loader": {"consumed_samples": 0},
        "rng": rng_state(),
        "config": model_only,
        "world_size": 1,
        "train_seconds": 0.0,
    }
    return save_checkpoint(out / "checkpoints", 0, lambda d: SingleEngine.write_weights(state, d, model_cfg), trainer_state)


# --- command lines ----------------------------------------------------------------------

ERRORS = (ConfigError, FileNotFoundError, FileExistsError, ValueError, ImportError, KeyError)


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers from_pretrained directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint dir (default: RUN's latest)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="sentencepiece .model (default: data.tokenizer of RUN)")
    args = parser.parse_args(argv)
    try:
        info = export_hf(args.run_dir, args.out, args.checkpoint, args.tokenizer)
    except ERRORS as err:
        print(f"mgt-export: error: {err}", file=sys.stderr)
        return 2
    load = "AutoModelForCausalLM.from_pretrained(DIR" + (", trust_remote_code=True)" if info["remote_code"] else ")")
    print(f"mgt-export: {info['checkpoint']} -> {args.out} ({info['architecture']}; load with {load})")
    if info["tokenizer"] is None:
        print("mgt-export: no tokenizer (data.tokenizer is empty; pass --tokenizer)")
    for text in info["tokenizer_mismatch"]:
        print(
            f"mgt-export: warning: the converted tokenizer.json encodes {text!r} differently from sentencepiece; use tokenizer.model with sentencepiece",
            file=sys.stderr,
        )
    return 0


def import_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", type=Path, help="a LlamaForCausalLM / StableLmForCausalLM / mgt-export directory (safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="new run directory (empty or absent)")
    args = parser.parse_args(argv)
    try:
        ckpt = import_hf(args.hf_dir, args.out)
    except ERRORS as err:
        print(f"mgt-import: error: {err}", file=sys.stderr)
        return 2
    print(
        f"mgt-import: {args.hf_dir} -> {ckpt} ({TRAINER_STATE} at step 0); mgt-eval {args.out} data.valid_prefix=... | train.resume={ckpt}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
