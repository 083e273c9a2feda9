"""Config schema: defaults, YAML presets with inheritance, dotted overrides, errors that
name the key, cross-field validation, and every shipped preset loads."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from megatron_mgt import config as C
from megatron_mgt.config import Config, ConfigError, from_dict, load_config, to_dict, validate
from megatron_mgt.model.residual import RESIDUAL_RULES

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(
    p
    for pattern in ("**/*.yaml", "**/*.yml")
    for p in (REPO / "configs").glob(pattern)
    if "deepspeed" not in p.relative_to(REPO / "configs").parts
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_validate():
    cfg = load_config()
    validate(cfg)
    assert cfg == Config()
    assert cfg.model.residual in C.RESIDUALS
    assert cfg.data.seq_len <= cfg.model.max_seq_len


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


def test_every_field_has_a_default():
    """Config() must be constructible from nothing; presets only override."""

    def walk(obj):
        for f in dataclasses.fields(obj):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)

    walk(Config())


def test_presets_exist():
    assert PRESETS, "no YAML presets found under configs/"


@pytest.mark.parametrize("preset", PRESETS, ids=[str(p.relative_to(REPO / "configs")) for p in PRESETS])
def test_shipped_preset_loads(preset):
    spec = yaml.safe_load(preset.read_text())
    if isinstance(spec, dict) and "presets" in spec:
        # a job array (megatron_mgt/job_array.py): every run it lists must load
        from megatron_mgt.job_array import load_array

        assert load_array(preset)
        return
    if isinstance(spec, dict) and "experiment" in spec:
        # an experiment preset (megatron_mgt/experiments): a different schema whose `base`
        # names a training preset; both must load
        assert spec.get("base"), f"{preset}: experiment preset without a base training preset"
        cfg = load_config(preset.parent / spec["base"])
        if importlib.util.find_spec("megatron_mgt.experiments.common") is not None:
            from megatron_mgt.experiments.common import load_experiment

            cfg = load_experiment(spec["experiment"], preset).base
    else:
        cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.model.residual in RESIDUAL_RULES
