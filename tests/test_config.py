"""Config schema: defaults, YAML presets with inheritance, dotted overrides, errors that
name the key, cross-field validation, and every shipped preset loads."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml

from megatron_mgt import config as C
from megatron_mgt.config import (
    Config,
    ConfigError,
    from_dict,
    load_config,
    merge,
    override_text,
    parse_override,
    read_yaml,
    to_dict,
    validate,
)
from megatron_mgt.model.residual import RESIDUAL_RULES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PRESETS = sorted(p for pattern in ("*.yaml", "*.yml") for p in CONFIGS.rglob(pattern))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def leaves(obj, prefix: str = ""):
    """(dotted key, annotation, value) of every field of a config that is not itself a section."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], value


def flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def other_value(key: str, annotation, value):
    """A value of the field's type that differs from `value`."""
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return choices[(choices.index(value) + 1) % len(choices)]
    if annotation is bool:
        return not value
    if annotation is int:
        return value + 3
    if annotation is float:
        return value + 0.25
    if annotation is str:
        return f"{value}_x"
    raise AssertionError(f"{key}: no test value for a field of type {annotation}; extend other_value in tests/test_config.py")


def set_default(monkeypatch, cls: type, name: str, value) -> None:
    """Make `value` the default of field `name` of dataclass `cls`, for every Config() built after."""
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    defaults = list(cls.__init__.__defaults__)
    defaults[params.index(name) - (len(params) - len(defaults))] = value
    monkeypatch.setattr(cls.__init__, "__defaults__", tuple(defaults))


BAD_DEFAULTS = [
    (C.MGTConfig, "beta_init", 1.5, "model.mgt.beta_init"),  # outside (eps - lam, eps + lam)
    (C.Rank1DDLConfig, "beta_init", 2.0, "model.ddl_rank1.beta_init"),
    (C.ModelConfig, "n_heads", 3, "model.n_heads"),  # 256 is not divisible by 3
    (C.ModelConfig, "residual", "pre_ln", "model.residual"),
    (C.DataConfig, "seq_len", 512, "data.seq_len"),  # longer than model.max_seq_len
    (C.StabilityConfig, "window", 1, "stability: window"),
    (C.ParallelConfig, "partition_method", "greedy", "parallel.partition_method"),
]


def test_defaults_validate_and_validate_catches_a_bad_default(monkeypatch):
    """Config() passes every cross-field check, and the same checks refuse it once one default is bad."""
    validate(Config())
    assert load_config() == Config()
    for cls, name, bad, key in BAD_DEFAULTS:
        with monkeypatch.context() as patch:
            set_default(patch, cls, name, bad)
            assert getattr(cls(), name) == bad
            with pytest.raises(ConfigError, match=re.escape(key)):
                validate(Config())
            with pytest.raises(ConfigError, match=re.escape(key)):
                load_config()
    validate(Config())  # the defaults are back


def test_every_field_takes_a_dotted_override():
    """Each field, set alone by `key=value`, lands on that field with its type; the rest keep
    their defaults. And every default written as an override reads back as itself."""
    fields = list(leaves(Config()))
    assert len(fields) > 50 and all("." in key for key, _, _ in fields)
    default = flat(to_dict(Config()))
    assert set(default) == {key for key, _, _ in fields}
    for key, annotation, value in fields:
        new = other_value(key, annotation, value)
        assert new != value, key
        cfg = Config()
        merge(cfg, parse_override(override_text(key, new)))  # no validate(): one changed knob may break a cross-field rule
        got = flat(to_dict(cfg))
        assert got[key] == new and type(got[key]) is type(new), (key, got[key], new)
        assert {k: v for k, v in got.items() if k != key} == {k: v for k, v in default.items() if k != key}, key
    assert load_config(None, [override_text(key, value) for key, _, value in fields]) == Config()


def test_config_round_trips_through_yaml(tmp_path):
    """to_dict -> yaml.safe_dump -> a preset file -> the same Config: for the defaults (through
    load_config) and for a config whose every field differs from its default (through merge)."""
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(to_dict(Config())))
    assert load_config(path) == Config()
    changed = Config()
    for key, annotation, value in leaves(Config()):
        merge(changed, parse_override(override_text(key, other_value(key, annotation, value))))
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(to_dict(changed)))
    back = Config()
    merge(back, read_yaml(path))
    assert back == changed
    assert all(a != b for a, b in zip(flat(to_dict(back)).values(), flat(to_dict(Config())).values(), strict=True))


def test_residual_names_match_registry():
    assert tuple(C.RESIDUALS) == tuple(RESIDUAL_RULES)


def test_round_trip_through_dict():
    cfg = load_config(overrides=["model.residual=ddl", "model.mgt.lam=0.5", "train.lr=1e-3"])
    back = from_dict(to_dict(cfg))
    assert back == cfg
    assert back.model.mgt.lam == 0.5


def test_preset_inherits_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  d_model: 128\n  n_heads: 4\n  n_layers: 6\ntrain:\n  lr: 0.001\n  max_steps: 50\n")
    child = write(
        tmp_path / "sub" / "child.yaml",
        "inherit: ../base.yaml\nmodel:\n  n_layers: 24\n  mgt:\n    lam: 0.5\ntrain:\n  max_steps: 7\n",
    )
    cfg = load_config(child)
    assert cfg.model.d_model == 128 and cfg.model.n_heads == 4  # from the parent
    assert cfg.model.n_layers == 24 and cfg.train.max_steps == 7  # the child wins
    assert cfg.train.lr == 0.001
    assert cfg.model.mgt.lam == 0.5
    assert cfg.model.mgt.eps == C.MGTConfig().eps  # untouched knobs keep defaults
    # overrides come last and beat both files
    cfg = load_config(child, ["train.max_steps=3", "model.d_model=64"])
    assert cfg.train.max_steps == 3 and cfg.model.d_model == 64 and cfg.model.n_layers == 24


def test_three_level_inheritance(tmp_path):
    write(tmp_path / "a.yaml", "train:\n  seed: 1\n  lr: 0.5\n")
    write(tmp_path / "b.yaml", "inherit: a.yaml\ntrain:\n  seed: 2\n")
    c = write(tmp_path / "c.yaml", "inherit: b.yaml\nlog:\n  every: 3\n")
    cfg = load_config(c)
    assert (cfg.train.seed, cfg.train.lr, cfg.log.every) == (2, 0.5, 3)


def test_inherit_cycle_is_a_config_error(tmp_path):
    write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    b = write(tmp_path / "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(b)
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path / "self.yaml", "inherit: self.yaml\n"))


def test_missing_parent_is_a_config_error(tmp_path):
    child = write(tmp_path / "child.yaml", "inherit: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(child)


def test_dotted_overrides_types_and_nesting():
    cfg = load_config(
        overrides=[
            "model.mgt.lam=0.5",
            "model.mgt.alpha_mode=channel",
            "model.residual=preln",
            "model.tie_embeddings=false",
            "train.max_steps=20",
            "train.lr=3e-4",  # YAML 1.1 reads this as a string; must still be a float
            "model.mgt.eps=0",  # an int where a float is expected
            "log.run_name=a=b",  # only the first '=' splits
        ]
    )
    assert cfg.model.mgt.lam == 0.5
    assert cfg.model.mgt.alpha_mode == "channel"
    assert cfg.model.residual == "preln"
    assert cfg.model.tie_embeddings is False
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.mgt.eps == 0.0 and isinstance(cfg.model.mgt.eps, float)
    assert cfg.log.run_name == "a=b"


def test_unknown_key_names_it_and_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.lrr=1"])
    assert "train.lrr" in str(err.value)
    assert "'lr'" in str(err.value)


def test_unknown_nested_key_and_section(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.mgt.lamda=0.5"])
    assert "model.mgt.lamda" in str(err.value) and "'lam'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["trian.lr=1"])
    assert "trian" in str(err.value) and "'train'" in str(err.value)
    preset = write(tmp_path / "p.yaml", "model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(preset)
    assert "model.n_layer" in str(err.value) and "'n_layers'" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.max_steps=true", "train.max_steps"),  # bool is not an int here
        ("train.lr=fast", "train.lr"),
        ("model.tie_embeddings=3", "model.tie_embeddings"),
        ("model.mgt=0.5", "model.mgt"),  # a section needs a mapping
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert key in str(err.value)


def test_literal_violation_names_key_and_choices():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.mgt.beta_granularity=chanel"])
    msg = str(err.value)
    assert "model.mgt.beta_granularity" in msg and "'channel'" in msg
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(overrides=["train.precision=fp16"])


def test_unknown_residual_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.residual=pre_ln"])
    assert "model.residual" in str(err.value) and "'preln'" in str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["train.lr"])


def test_d_model_must_divide_by_heads():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.d_model=100", "model.n_heads=3"])
    assert "model.d_model" in str(err.value) and "model.n_heads" in str(err.value)
    load_config(overrides=["model.d_model=96", "model.n_heads=3"])  # 32 per head: fine


def test_head_dim_must_be_even_for_rope():
    with pytest.raises(ConfigError, match="head_dim"):
        load_config(overrides=["model.d_model=36", "model.n_heads=4"])


@pytest.mark.parametrize(
    "lam, eps, beta_init, ok",
    [
        (1.0, 0.0, 0.1, True),
        (1.0, 0.0, 0.999, True),
        (1.0, 0.0, 1.0, False),  # on the boundary: atanh would be infinite
        (1.0, 0.0, -1.0, False),
        (0.5, 1.0, 1.2, True),  # range (0.5, 1.5)
        (0.5, 1.0, 0.4, False),
        (0.5, 1.0, 1.6, False),
    ],
)
def test_beta_init_must_lie_inside_the_beta_range(lam, eps, beta_init, ok):
    overrides = [f"model.mgt.lam={lam}", f"model.mgt.eps={eps}", f"model.mgt.beta_init={beta_init}"]
    if ok:
        assert load_config(overrides=overrides).model.mgt.beta_init == beta_init
    else:
        with pytest.raises(ConfigError, match="beta_init"):
            load_config(overrides=overrides)


def test_other_cross_field_checks():
    with pytest.raises(ConfigError, match="lam"):
        load_config(overrides=["model.mgt.lam=0"])
    with pytest.raises(ConfigError, match="data.seq_len"):
        load_config(overrides=["data.seq_len=512", "model.max_seq_len=256"])
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config(overrides=["train.micro_batch_size=0"])


def test_preset_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="YAML"):
        load_config(write(tmp_path / "bad.yaml", "model: [unclosed\n"))


def preset_kind(path: Path) -> str:
    """How a file under configs/ is loaded: configs/wt103/array_*.yaml are job arrays
    (megatron_mgt.job_array.load_array); under configs/experiments/ a file with `experiment:` is
    an experiment preset (experiments.common.load_experiment), one with `campaign:` a list of
    experiment steps (mgt-experiment campaign), any other the training preset they inherit;
    every other file is a training preset (load_config)."""
    rel = path.relative_to(CONFIGS)
    if rel.match("wt103/array_*.yaml"):
        return "array"
    if rel.parts[0] == "experiments":
        spec = yaml.safe_load(path.read_text()) or {}
        return "campaign" if "campaign" in spec else "experiment" if "experiment" in spec else "training"
    return "training"


def test_presets_exist():
    kinds = {preset_kind(p) for p in PRESETS}
    assert {"training", "experiment", "array"} <= kinds, f"presets under configs/: {sorted(kinds)}"


@pytest.mark.parametrize("preset", PRESETS, ids=[str(p.relative_to(CONFIGS)) for p in PRESETS])
def test_shipped_preset_loads(preset, tmp_path):
    """Every preset loads and validates the way its runner loads it, and each training config it
    yields round-trips through YAML."""
    from megatron_mgt.experiments.cli import EXPERIMENTS
    from megatron_mgt.experiments.common import load_experiment
    from megatron_mgt.job_array import load_array

    kind, spec = preset_kind(preset), yaml.safe_load(preset.read_text()) or {}
    if kind == "array":
        runs = load_array(preset)  # validates every run
        assert runs
        configs = [load_config(run.preset, run.overrides) for run in runs]
    elif kind == "experiment":
        assert spec["experiment"] in EXPERIMENTS and spec.get("base"), f"{preset}: needs a known experiment and a base training preset"
        configs = [load_experiment(spec["experiment"], preset).base]
    elif kind == "campaign":
        steps = spec["campaign"]
        assert steps and all(step["experiment"] in EXPERIMENTS for step in steps), steps
        configs = [load_experiment(s["experiment"], preset.parent / s["preset"], s.get("overrides", [])).base for s in steps]
    else:
        configs = [load_config(preset)]
    for cfg in configs:
        assert isinstance(cfg, Config) and cfg.model.residual in RESIDUAL_RULES
        dumped = tmp_path / "dumped.yaml"
        dumped.write_text(yaml.safe_dump(to_dict(cfg)))
        assert load_config(dumped) == cfg
