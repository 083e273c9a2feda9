"""The trainer: exact resume, signals, divergence, atomic checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_mgt.checkpoint import CheckpointError, find_checkpoint, save_checkpoint
from megatron_mgt.config import load_config
from megatron_mgt.metrics import read_metrics
from megatron_mgt.train import TrainingDiverged, train
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl", "train")]


@pytest.mark.parametrize("residual", ["mgt", "preln"])
def test_resume_is_bit_exact(zipf_shards, tmp_path, residual):
    n = 5
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = {"train.max_steps": 2 * n, "train.save_every": 0, "train.grad_accum_steps": 2, "model.residual": residual}
    train(load_config(None, tiny_overrides(*zipf_shards, straight, **common)))
    first = train(load_config(None, tiny_overrides(*zipf_shards, split, **common, **{"train.exit_at_step": n})))
    assert first.status.startswith("exited") and first.step == n
    second = train(load_config(None, tiny_overrides(*zipf_shards, split, **common)))
    assert second.status == "finished" and second.step == 2 * n

    assert [s for s, _ in _losses(split)] == list(range(1, 2 * n + 1))
    assert _losses(straight) == _losses(split)  # bit for bit: floats compared exactly
    a = torch.load(Path(find_checkpoint(straight / "checkpoints", "auto")) / "model.pt")
    b = torch.load(Path(find_checkpoint(split / "checkpoints", "auto")) / "model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_sigterm_checkpoints_and_exits_cleanly(zipf_shards, tmp_path, sig):
    run = tmp_path / "run"
    args = tiny_overrides(*zipf_shards, run, **{"train.max_steps": 100000, "train.save_every": 0, "train.eval_every": 0})
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_mgt.train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(_losses(run)) >= 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"signalled ({sig.name})" in out
    ckpt = find_checkpoint(run / "checkpoints", "auto")
    assert ckpt is not None
    steps = [s for s, _ in _losses(run)]
    assert ckpt.name == f"step_{steps[-1]:08d}"
    resumed = train(load_config(None, tiny_overrides(*zipf_shards, run, **{"train.max_steps": steps[-1] + 2, "train.eval_every": 0})))
    assert resumed.step == steps[-1] + 2
    assert [s for s, _ in _losses(run)] == list(range(1, steps[-1] + 3))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(zipf_shards, tmp_path):
    run = tmp_path / "run"
    # An absurd learning rate blows the weights up after the first update.
    cfg = load_config(
        None,
        tiny_overrides(*zipf_shards, run, **{"train.lr": 1e30, "train.warmup_steps": 1, "train.save_every": 1, "train.grad_clip": 0.0}),
    )
    with pytest.raises(TrainingDiverged, match="not finite"):
        train(cfg)
    events = read_metrics(run / "metrics.jsonl", "event")
    bad_step = events[-1]["step"]
    assert events[-1]["event"] == "non_finite"
    last_good = find_checkpoint(run / "checkpoints", "auto")
    assert last_good is not None and last_good.name == f"step_{bad_step - 1:08d}"
    state = torch.load(last_good / "model.pt")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_interrupted_checkpoint_write_keeps_previous(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, lambda d: (d / "model.pt").write_text("one"), {"step": 1})

    def crash(directory: Path) -> None:
        (directory / "model.pt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(CheckpointError, match="step_00000002 could not be written: OSError: disk full"):
        save_checkpoint(root, 2, crash, {"step": 2})
    latest = find_checkpoint(root, "auto")
    assert latest.name == "step_00000001"
    assert (latest / "model.pt").read_text() == "one"
    assert not (root / "step_00000002").exists() and not list(root.glob(".step_*"))  # temp dir removed


def test_keep_prunes_old_checkpoints(tmp_path):
    """Pruned checkpoints leave the listing at once (renamed to .trash) and are deleted in the
    background; trash a killed process left behind goes at the next start."""
    from megatron_mgt.checkpoint import prune_checkpoints, remove_stale_temps, wait_for_pruning

    root = tmp_path / "checkpoints"
    for step in range(1, 5):
        save_checkpoint(root, step, lambda d: (d / "model.pt").write_bytes(b"x" * 4096), {"step": step}, keep=2)
        assert sorted(p.name for p in root.glob("step_*")) == [f"step_{s:08d}" for s in range(max(1, step - 1), step + 1)]
    wait_for_pruning(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert find_checkpoint(root, "auto").name == "step_00000004"
    # a process killed mid-deletion: its trash is invisible to resume and removed at the next start
    (root / ".step_00000002.trash").mkdir()
    (root / ".step_00000002.trash" / "model.pt").write_bytes(b"partial")
    assert [p.name for p in reversed(sorted(root.glob("step_*")))][0] == find_checkpoint(root, "auto").name
    assert remove_stale_temps(root) == [".step_00000002.trash"]
    assert prune_checkpoints(root, keep=1) == [root / ".step_00000003.trash"]
    wait_for_pruning()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]


def test_prune_keeps_the_current_checkpoint_and_never_fails_a_save(tmp_path, monkeypatch, capsys):
    """After a resume from an older checkpoint the new one may sort before abandoned newer ones:
    it is kept anyway. A checkpoint that cannot be renamed stays, with a warning."""
    from megatron_mgt import checkpoint as ck

    root = tmp_path / "checkpoints"
    for step in (1, 5, 9):
        save_checkpoint(root, step, lambda d: None, {"step": step})
    final = save_checkpoint(root, 3, lambda d: None, {"step": 3}, keep=1)  # resumed from step 1, saved at 3
    ck.wait_for_pruning(root)
    assert final.is_dir() and (root / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000009"]
    real_rename = ck.os.rename
    monkeypatch.setattr(ck.os, "rename", lambda a, b: (_ for _ in ()).throw(PermissionError(13, "denied")) if str(b).endswith(".trash") else real_rename(a, b))
    save_checkpoint(root, 11, lambda d: None, {"step": 11}, keep=1)
    assert "could not prune checkpoint" in capsys.readouterr().err
    assert {"step_00000009", "step_00000011"} <= {p.name for p in root.glob("step_*")}


def test_vocab_mismatch_with_data_is_a_clear_error(zipf_shards, tmp_path):
    cfg = load_config(None, tiny_overrides(*zipf_shards, tmp_path / "run", **{"model.vocab_size": 100}))
    with pytest.raises(ValueError, match="vocab"):
        train(cfg)


def test_lr_schedule_is_linear_warmup_then_cosine():
    from megatron_mgt.config import TrainConfig
    from megatron_mgt.engine.optim import lr_factor

    t = TrainConfig(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_factor(s, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, t) == pytest.approx(1.0)
    assert lr_factor(9, t) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_factor(14, t) == pytest.approx(0.1) and lr_factor(30, t) == pytest.approx(0.1)


def test_wandb_mode_auto(monkeypatch, tmp_path):
    from megatron_mgt.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password key\n")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"


def test_cpu_malloc_keep_is_applied_once_and_bad_modes_are_refused(zipf_shards, tmp_path):
    """train.cpu_malloc=keep applies glibc's mallopt settings once per process on a CPU run
    (engine/host_memory.py; run in a child process so the test session's allocator stays as
    it is); the mode is validated by the config and by the function."""
    from megatron_mgt.config import ConfigError
    from megatron_mgt.engine import host_memory

    assert load_config(None, []).train.cpu_malloc == "keep"
    code = (
        "import sys; from megatron_mgt.config import load_config; from megatron_mgt.train import train; "
        "from megatron_mgt.engine import host_memory as h; "
        f"cfg = load_config(None, {tiny_overrides(*zipf_shards, tmp_path / 'run', **{'train.max_steps': 1, 'train.save_every': 0, 'train.cpu_malloc': 'keep'})!r}); "
        "assert train(cfg).status == 'finished'; print(h._applied); print(h.tune_cpu_malloc('default'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    applied = out.stdout.split()[-2:]
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        assert applied == ["keep", "keep"]  # glibc cannot be reset: a later call says what holds
    with pytest.raises(ValueError, match="train.cpu_malloc"):
        host_memory.tune_cpu_malloc("fast")
    with pytest.raises(ConfigError, match="cpu_malloc"):
        load_config(None, ["train.cpu_malloc=fast"])
