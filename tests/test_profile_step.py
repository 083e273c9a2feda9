"""bench/profile_step.py at a tiny shape: categories partition the profiled step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "profile_step.py"


def load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_categories():
    module = load()
    assert module.category("aten::mm") == "gemm"
    assert module.category("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert module.category("aten::_log_softmax") == "loss"
    assert module.category("aten::native_layer_norm_backward") == "norm"
    assert module.category("aten::sigmoid") == module.OTHER


def test_profile_partitions_the_step(tmp_path):
    out = load().main(["--layers", "2", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq-len", "16", "--batch", "2",
                       "--variants", "preln,mgt", "--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(tmp_path / "p.json")])
    for variant in ("preln", "mgt"):
        r = out["results"][variant]
        assert r["step_self_s"] == pytest.approx(sum(r["categories_s"].values()))
        assert sum(r["share"].values()) == pytest.approx(1.0)
        assert r["categories_s"]["gemm"] > 0 and r["categories_s"]["optimizer"] > 0 and r["categories_s"]["loss"] > 0
        assert r["phases_s"]["backward"] > 0 and r["phases_s"]["forward"] > 0
    assert (tmp_path / "p.json").exists()
