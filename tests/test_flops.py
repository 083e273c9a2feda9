"""FLOPs per token (PaLM count) and device peaks, checked against hand counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import D, V, tiny_config
from torch import nn

from megatron_mgt.config import MGTConfig
from megatron_mgt.flops import (
    cuda_peak_flops_from_name,
    device_peak_flops,
    flops_per_token,
    matmul_params,
    measure_cpu_peak_flops,
    remembered_cpu_peak,
)
from megatron_mgt.model import Transformer

L = 2  # layers of the hand counts
FF = 128  # SwiGLU default for d=32: int(8*32/3) = 85, rounded up to a multiple of 64


def test_ffn_dim_assumed_by_the_hand_count():
    assert tiny_config("preln", n_layers=L).ffn_dim == FF


@pytest.mark.parametrize(
    "residual, knobs, extra_per_layer",
    [
        ("preln", {}, 0),
        ("postln", {}, 0),
        ("deepnorm", {}, 0),
        ("mhc", {}, 2 * D * D),  # W_gate per sublayer
        ("ddl", {}, 2 * D * D),  # W_beta (d x d) per sublayer
        ("mgt", {}, 4 * D * D),  # both
        ("mgt", {"beta_granularity": "token"}, 2 * D * D + 2 * D),  # W_beta is d x 1
    ],
)
def test_matmul_params_hand_count(residual, knobs, extra_per_layer):
    # per layer: qkv 3d^2 + out d^2 + SwiGLU gate/up/down 3 d ff; head V d once
    expected = L * (4 * D * D + 3 * D * FF + extra_per_layer) + V * D
    model = Transformer(tiny_config(residual, n_layers=L, mgt=MGTConfig(**knobs)))
    assert matmul_params(model) == expected


def test_tied_head_counted_once_and_embedding_lookup_excluded():
    tied = Transformer(tiny_config("preln", n_layers=L, tie_embeddings=True))
    untied = Transformer(tiny_config("preln", n_layers=L, tie_embeddings=False))
    # the untied model holds one more V x d matrix (the embedding) ...
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == V * D
    # ... but the lookup is not a matmul: both count the head exactly once
    expected = L * (4 * D * D + 3 * D * FF) + V * D
    assert matmul_params(tied) == expected
    assert matmul_params(untied) == expected


def test_shared_linear_weight_counted_once():
    a, b = nn.Linear(8, 4, bias=True), nn.Linear(8, 4, bias=True)
    b.weight = a.weight
    assert matmul_params(nn.Sequential(a, b)) == 32  # biases are not matmul weights
    assert matmul_params(nn.Sequential(a, nn.Linear(8, 4))) == 64


def test_flops_per_token_hand_count():
    cfg = tiny_config("preln", n_layers=L)
    n = matmul_params(Transformer(cfg))
    assert n == 2 * (4 * 1024 + 3 * 32 * 128) + 64 * 32 == 34816
    # 6 * 34816 + 12 * L(2) * H(2) * d_head(16) * T(16)
    assert flops_per_token(cfg, n, seq_len=16) == 6 * 34816 + 12 * 2 * 2 * 16 * 16 == 221184
    # the attention term grows linearly with the sequence length, the 6N term does not
    assert flops_per_token(cfg, n, 32) - flops_per_token(cfg, n, 16) == 12 * 2 * 2 * 16 * 16


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce GTX 1080", None),
        ("Tesla V100-SXM2-16GB", None),  # no bf16: no MFU rather than a wrong one
    ],
)
def test_cuda_peak_table(name, peak):
    assert cuda_peak_flops_from_name(name) == peak


def test_cpu_peak_is_measured():
    rate = measure_cpu_peak_flops(seconds=0.05, size=256)
    assert 1e8 < rate < 1e14  # a real GEMM rate, not a constant or a time
    assert device_peak_flops("meta") is None


def test_remembered_cpu_peak_keeps_the_best_per_cpu_key(tmp_path, monkeypatch):
    cache = tmp_path / "sub" / "cpu_peak.json"
    assert remembered_cpu_peak(5e10, cache) == 5e10  # first: stored
    assert remembered_cpu_peak(2e10, cache) == 5e10  # a loaded measurement: the remembered best
    assert remembered_cpu_peak(7e10, cache) == 7e10  # a better one replaces it
    (key, value), = json.loads(cache.read_text()).items()
    assert value == 7e10 and f"{torch.get_num_threads()} threads" in key
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)  # another thread count: its own entry
    assert remembered_cpu_peak(1e10, cache) == 1e10
    assert len(json.loads(cache.read_text())) == 2


def test_remembered_cpu_peak_replaces_a_damaged_cache(tmp_path):
    cache = tmp_path / "cpu_peak.json"
    cache.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable CPU peak cache"):
        assert remembered_cpu_peak(3e10, cache) == 3e10
    assert list(json.loads(cache.read_text()).values()) == [3e10]


@pytest.mark.parametrize("value", ["abc", None, [1], float("inf"), float("nan"), -1.0, True])
def test_remembered_cpu_peak_drops_entries_that_are_not_rates(tmp_path, value):
    cache = tmp_path / "cpu_peak.json"
    from megatron_mgt.flops import _cpu_key

    cache.write_text(json.dumps({_cpu_key(): value, "other cpu": 9e10}))
    with pytest.warns(UserWarning, match="not finite positive rates"):
        assert remembered_cpu_peak(3e10, cache) == 3e10
    assert json.loads(cache.read_text()) == {"other cpu": 9e10, _cpu_key(): 3e10}


def test_remembered_cpu_peak_without_a_home(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("Could not determine home directory."))))
    with pytest.warns(UserWarning, match="no home directory"):
        assert remembered_cpu_peak(4e10) == 4e10


def test_remembered_cpu_peak_without_a_writable_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="not writable"):
        assert remembered_cpu_peak(4e10, blocker / "cpu_peak.json") == 4e10  # parent is a file


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_peak_uses_table():
    assert device_peak_flops("cuda") == cuda_peak_flops_from_name(torch.cuda.get_device_name(0))
