"""Faults a run must survive or report clearly (docs/ROBUSTNESS.md): the run-directory lock,
resume under a changed config, a full disk, damaged checkpoints and metrics, signals, and
mgt-prep / config errors that used to end in bare tracebacks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_prep.cli import main as prep_main
from data_prep.shards import tokenize_to_shards
from data_prep.tokenizer import train_tokenizer
from megatron_mgt import checkpoint as ckpt_mod
from megatron_mgt.checkpoint import MANIFEST, CheckpointError, RunLock, RunLockedError, find_checkpoint, verify_checkpoint
from megatron_mgt.compare import main as compare_main
from megatron_mgt.config import ConfigError, TrainConfig, load_config, resume_changes
from megatron_mgt.engine.optim import lr_factor
from megatron_mgt.evaluate import main as eval_main
from megatron_mgt.metrics import MetricsError, MetricsLog, read_metrics
from megatron_mgt.train import StopFlag, train
from megatron_mgt.train import main as train_main
from tests.conftest import tiny_overrides, write_zipf_shard

REPO = Path(__file__).resolve().parents[1]
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.\n" * 20


def run(shards, run_dir: Path, **extra):
    return train(load_config(None, tiny_overrides(*shards, run_dir, **extra)))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl", "train")]


def events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_metrics(run_dir / "metrics.jsonl", "event") if e["event"] == name]


# ---------------------------------------------------------------- 1. the run-directory lock


def test_second_trainer_is_refused_naming_the_holder(zipf_shards, tmp_path, capsys):
    holder = RunLock(tmp_path / "run")
    holder.acquire()
    with pytest.raises(RunLockedError, match=rf"in use by another trainer \(pid {os.getpid()} on "):
        run(zipf_shards, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert train_main(tiny_overrides(*zipf_shards, tmp_path / "run")) == 2
    assert "in use by another trainer" in capsys.readouterr().err
    holder.release()
    assert run(zipf_shards, tmp_path / "run").status == "finished"


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = f"from pathlib import Path; from megatron_mgt.checkpoint import RunLock; RunLock(Path({str(tmp_path)!r})).acquire(); print('locked', flush=True); input()"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"pid {child.pid} on"):
        RunLock(tmp_path).acquire()
    child.kill()
    child.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # the OS dropped the dead holder's lock
    lock.release()


# ---------------------------------------------------------------- 2. resume under a changed config


def test_changed_lr_and_max_steps_take_effect_and_are_recorded(zipf_shards, tmp_path):
    run_dir = tmp_path / "run"
    run(zipf_shards, run_dir, **{"train.exit_at_step": 4})
    result = run(zipf_shards, run_dir, **{"train.lr": 0.01, "train.max_steps": 10})
    assert result.status == "finished" and result.step == 10
    (resumed,) = events(run_dir, "resumed")
    assert {"key": "train.lr", "old": 0.003, "new": 0.01} in resumed["config_changes"]
    assert {"key": "train.max_steps", "old": 8, "new": 10} in resumed["config_changes"]
    cfg = load_config(run_dir / "config.yaml")  # the comment lines keep the history, the body is what ran
    assert cfg.train.lr == 0.01 and cfg.train.max_steps == 10
    assert "# step 4, resumed from" in (run_dir / "config.yaml").read_text() and "train.lr 0.003 -> 0.01" in (run_dir / "config.yaml").read_text()
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}
    assert lrs[4] == pytest.approx(0.003 * lr_factor(4, TrainConfig(lr=0.003, warmup_steps=2, max_steps=8)))
    for step in (5, 9):  # this run's lr on this run's schedule from the first step after the resume
        assert lrs[step] == pytest.approx(0.01 * lr_factor(step, cfg.train))


def test_changed_architecture_or_seed_is_refused(zipf_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(zipf_shards, run_dir)
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_00000008: model.n_layers is 3 in the checkpoint and 4 in this run"):
        run(zipf_shards, run_dir, **{"model.n_layers": 4})
    assert train_main(tiny_overrides(*zipf_shards, run_dir, **{"train.seed": 7})) == 2
    assert "train.seed is 1234 in the checkpoint and 7 in this run" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == before  # the record stays true


def test_resume_policy_table():
    old = {"train": {"lr": 1.0, "seed": 1}, "model": {"mgt": {"lam": 1.0}}, "log": {"every": 10}}
    assert resume_changes(old, {**old, "train": {"lr": 2.0, "seed": 1}, "log": {"every": 5}}) == [("train.lr", 1.0, 2.0), ("log.every", 10, 5)]
    with pytest.raises(ConfigError, match="model.mgt.lam is 1.0 in the checkpoint and 0.5 in this run"):
        resume_changes(old, {**old, "model": {"mgt": {"lam": 0.5}}})
    assert resume_changes({"train": {}}, {"train": {"new_key": 1}}) == []  # keys of another schema version are not compared


# ---------------------------------------------------------------- 3. a full disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_full_disk_during_a_checkpoint_on_a_real_tmpfs(zipf_shards, tmp_path, capsys):
    """The run dir on a tmpfs with room for one checkpoint (0.91 MiB each) and its metrics, not two."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1500k"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_full_disk_by_injection covers the same path")
    try:
        run_dir = disk / "run"
        assert train_main(tiny_overrides(*zipf_shards, run_dir, **{"train.keep_checkpoints": 2})) == 2
        err = capsys.readouterr().err
        assert "step_00000008 could not be written (disk full: ENOSPC)" in err and "free on that filesystem" in err
        assert "Traceback" not in err and "last good checkpoint is " + str(run_dir / "checkpoints" / "step_00000004") in err
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the partial checkpoint is gone
        good = find_checkpoint(run_dir / "checkpoints", "auto")
        assert good.name == "step_00000004" and verify_checkpoint(good) is None
        assert (run_dir / "metrics.jsonl").read_bytes().endswith(b"\n") and [s for s, _ in losses(run_dir)] == list(range(1, 9))
        copy = tmp_path / "moved"
        shutil.copytree(run_dir, copy)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert run(zipf_shards, copy).step == 8  # resumes from step 4 on a disk with room: nothing lost
    run(zipf_shards, tmp_path / "straight")
    assert losses(copy) == losses(tmp_path / "straight")


def test_full_disk_by_injection(zipf_shards, tmp_path, monkeypatch):
    """torch.save fails as it does on a full disk (a RuntimeError from inline_container.cc) at the second checkpoint."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if Path(f).parent.name == ".step_00000008.tmp" and Path(f).name == "optimizer.pt":
            Path(f).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4035")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=r"step_00000008 could not be written: RuntimeError: \[enforce fail.* free on that filesystem, a checkpoint needs about"):
        run(zipf_shards, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]


def test_metrics_records_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path, load_config(None, ["log.wandb=disabled"]), "cpu")
    log.log({"kind": "train", "step": 1, "loss": 1.0})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        return len(data) // 2

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(MetricsError, match=r"metrics.jsonl: cannot append a record \(No space left on device\)"):
        log.log({"kind": "train", "step": 2, "loss": 2.0})
    monkeypatch.setattr(os, "write", real_write)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n"


def test_torn_and_bad_metrics_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"kind": "train", "step": 1, "loss": 1.0, "grad_norm": 1.0}) + "\n"
    path.write_text(good + '{"kind": "train", "st')
    assert read_metrics(path) == [json.loads(good)]
    assert "metrics.jsonl:2: torn last line (21 bytes, no newline) skipped" in capsys.readouterr().err
    log = MetricsLog(tmp_path, load_config(None, ["log.wandb=disabled"]), "cpu")  # a resume drops the torn tail first
    assert log.repairs == {"torn_bytes_dropped": 21}
    log.close()
    assert path.read_text() == good
    path.write_text(good + "not json\n" + good)
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(path)
    assert compare_main([str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    assert "metrics.jsonl:2: not a JSON record" in capsys.readouterr().err


def test_resume_supersedes_the_records_of_steps_it_repeats(zipf_shards, tmp_path):
    run_dir = tmp_path / "run"
    run(zipf_shards, run_dir)
    first = losses(run_dir)
    root = run_dir / "checkpoints"
    shutil.rmtree(root / "step_00000008")  # as if killed after step 8's records, before its checkpoint
    (root / "latest").write_text("step_00000004\n")
    (root / ".step_00000008.tmp").mkdir()  # a killed checkpoint write
    (root / ".latest.tmp").write_text("step_0")
    (root / ".latest.4242.tmp").write_text("step_0")
    (run_dir / ".config.yaml.4243.tmp").write_text("train: {")  # a killed config.yaml write
    assert run(zipf_shards, run_dir).step == 8
    assert losses(run_dir) == first  # steps 5-8 once each, bit for bit the same
    assert [r["step"] for r in read_metrics(run_dir / "metrics.superseded.jsonl", "train")] == [5, 6, 7, 8]
    (resumed,) = events(run_dir, "resumed")
    assert resumed["records_superseded"] > 4 and resumed["removed_temps"] == [".step_00000008.tmp", ".latest.tmp", ".latest.4242.tmp", ".config.yaml.4243.tmp"]
    assert not (run_dir / ".config.yaml.4243.tmp").exists()
    assert not list(root.glob(".*.tmp"))


# ---------------------------------------------------------------- 4. damaged checkpoints


def test_truncated_newest_checkpoint_falls_back_with_a_warning(zipf_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(zipf_shards, run_dir)
    root = run_dir / "checkpoints"
    newest = root / "step_00000008"
    manifest = json.loads((newest / MANIFEST).read_text())["files"]
    assert set(manifest) == {p.name for p in newest.iterdir()} - {MANIFEST}  # every file the step dir holds
    with open(newest / "model.pt", "r+b") as f:
        f.truncate(1000)
    warnings: list[str] = []
    assert find_checkpoint(root, "auto", warn=warnings.append).name == "step_00000004"
    assert warnings == [f"checkpoint {newest} is damaged (model.pt is 1000 bytes, the manifest says {manifest['model.pt']}); passing over it to an older one"]
    capsys.readouterr()
    assert eval_main([str(run_dir), "--checkpoint", str(newest)]) == 2
    assert f"checkpoint {newest} is damaged: model.pt is 1000 bytes" in capsys.readouterr().err
    assert eval_main([str(run_dir), "eval.batches=1"]) == 0
    captured = capsys.readouterr()
    assert "passing over it" in captured.err and json.loads((run_dir / "eval" / "eval.json").read_text())["checkpoint"].endswith("step_00000004")
    assert run(zipf_shards, run_dir).step == 8  # the trainer falls back the same way, and says so
    (resumed,) = events(run_dir, "resumed")
    assert resumed["checkpoint"].endswith("step_00000004") and "model.pt is 1000 bytes" in resumed["rejected_checkpoints"][0]


def test_damaged_checkpoint_without_manifest_is_a_clear_error(zipf_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(zipf_shards, run_dir, **{"train.max_steps": 4})
    ckpt = run_dir / "checkpoints" / "step_00000004"
    (ckpt / MANIFEST).unlink()  # as written before manifests
    with open(ckpt / "model.pt", "r+b") as f:
        f.truncate(1000)
    assert eval_main([str(run_dir)]) == 2
    assert f"checkpoint {ckpt}: cannot load its weights" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt}: the engine cannot load it"):
        run(zipf_shards, run_dir, **{"train.max_steps": 8})


# ---------------------------------------------------------------- 5. messages, not tracebacks


def test_shard_of_another_tokenizer_fails_before_training(zipf_shards, tmp_path):
    write_zipf_shard(tmp_path / "valid_big", n_docs=4, doc_len=300, vocab=1000, seed=2)  # ids up to 999 > vocab 256
    with pytest.raises(ValueError, match=r"valid_big: token id \d+ does not fit model.vocab_size=256"):
        run((zipf_shards[0], str(tmp_path / "valid_big")), tmp_path / "run", **{"log.geometry_every": 0})
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was trained


def test_config_errors_are_messages():
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1': the value is not valid YAML"):
        load_config(None, ["train.lr=[1"])
    with pytest.raises(ConfigError, match=r"model.n_heads=0 must be positive"):
        load_config(None, ["model.n_heads=0"])


def test_sigint_stops_like_sigterm_and_a_second_one_exits_at_once(monkeypatch, capsys):
    with pytest.raises(KeyboardInterrupt):
        with StopFlag() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT  # the first: checkpoint and stop at the step boundary
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
    monkeypatch.setattr("megatron_mgt.train.train", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    assert train_main(["train.max_steps=1"]) == 130
    assert "interrupted by a second SIGINT" in capsys.readouterr().err


def test_finished_run_resumed_says_nothing_left(zipf_shards, tmp_path, capsys):
    args = tiny_overrides(*zipf_shards, tmp_path / "run")
    assert train_main(args) == 0 and train_main(args) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert "nothing left to train (train.max_steps=8)" in out and "nan" not in out and "step_00000008" in out


# ---------------------------------------------------------------- 5, 6. mgt-prep


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([TEXT], out / "tok", 300)
    return out / "tok.model"


def test_prep_output_errors(tokenizer, tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "file").write_text("")
    assert prep_main(["tokenize", "--tokenizer", str(tokenizer), "--out", str(tmp_path / "file"), str(tmp_path / "a.txt")]) == 1
    assert "is a file; it must be a directory" in capsys.readouterr().err
    monkeypatch.setattr("sentencepiece.SentencePieceTrainer.train", lambda **kw: pytest.fail("trained before checking the output"))
    monkeypatch.setattr("tempfile.mkstemp", lambda **kw: (_ for _ in ()).throw(PermissionError(errno.EROFS, "Read-only file system")))
    assert prep_main(["train-tokenizer", "--vocab-size", "300", "--out", str(tmp_path / "tok"), str(tmp_path / "a.txt")]) == 1
    assert f"cannot write to the output directory {tmp_path}: Read-only file system" in capsys.readouterr().err


def test_prep_says_why_a_split_is_empty(tokenizer, tmp_path, capsys):
    for i in range(7):
        (tmp_path / f"w{i}.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02 binary")
    bad = [str(tmp_path / "empty.txt"), str(tmp_path / "binary.txt")]
    assert prep_main(["tokenize", "--tokenizer", str(tokenizer), "--out", str(tmp_path / "o"), *bad]) == 1
    err = capsys.readouterr().err
    assert "no documents for split(s) ['train']" in err and "skipped documents: 2" in err
    assert prep_main(["train-tokenizer", "--vocab-size", "300", "--out", str(tmp_path / "t"), *bad]) == 1
    assert "skipped documents: 2" in capsys.readouterr().err
    texts = [str(tmp_path / f"w{i}.txt") for i in range(7)]
    assert prep_main(["tokenize", "--tokenizer", str(tokenizer), "--out", str(tmp_path / "o"), "--valid-fraction", "0.01", *texts]) == 1
    assert "--valid-fraction 0.01 of 7 documents rounds down to 0; use at least 0.143 or --valid-inputs" in capsys.readouterr().err


def test_per_split_seconds_and_stale_temps(tokenizer, tmp_path):
    from data_prep.sources import Document

    dead = 2**22 + 12345
    while True:  # a pid that is not running
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    stale = tmp_path / f".train.bin.{dead}.0badc0de.tmp"
    stale.write_bytes(b"left by a killed tokenize")
    items = [("train", Document(TEXT * 4, f"t{i}")) for i in range(9)] + [("valid", Document(TEXT, "v"))]
    stats = tokenize_to_shards(items, tokenizer, {"train": tmp_path / "train", "valid": tmp_path / "valid"}, chunk_chars=len(TEXT))
    assert not stale.exists()
    assert 0 < stats["valid"].seconds < stats["train"].seconds  # each split's own share of the time
    assert stats["train"].tokens_per_second == pytest.approx(stats["valid"].tokens_per_second, rel=0.9)


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real = ckpt_mod._fsync
    monkeypatch.setattr(ckpt_mod, "_fsync", lambda p: (synced.append(Path(p).name), real(p)))
    ckpt_mod.save_checkpoint(tmp_path, 1, lambda d: (d / "model.pt").write_bytes(b"w" * 10), {"step": 1})
    assert {"model.pt", "trainer.pt", ".step_00000001.tmp", tmp_path.name} <= set(synced)
    assert yaml.safe_load((tmp_path / "latest").read_text()) == "step_00000001"
    assert sorted(json.loads((tmp_path / "step_00000001" / MANIFEST).read_text())["files"]) == ["model.pt", "trainer.pt"]


def test_resume_may_resplit_the_global_batch_but_not_change_it():
    """Another engine or world size may continue a run with the same global batch (micro x accum x dp)."""
    from megatron_mgt.config import Config, ConfigError, resume_changes, to_dict

    saved, now = to_dict(Config()), to_dict(Config())
    saved["train"]["micro_batch_size"], now["train"]["micro_batch_size"] = 4, 2
    assert resume_changes(saved, now, saved_dp=1, current_dp=2) == [("train.micro_batch_size", 4, 2)]
    with pytest.raises(ConfigError, match="train.micro_batch_size is 4 in the checkpoint and 2"):
        resume_changes(saved, now, saved_dp=1, current_dp=1)
