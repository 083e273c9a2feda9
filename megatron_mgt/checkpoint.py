"""Atomic, verified checkpoints, `resume=auto` with fallback, and the run-directory lock.

Layout: RUN/checkpoints/step_00000100/{model.pt, optimizer.pt, trainer.pt, rank_00000.pt,
manifest.json} (the engine writes its own files, docs/ENGINES.md lists them per engine; the
trainer writes trainer.pt: step, data position, RNG states, config, and every rank writes
rank_NNNNN.pt: its RNG states and data position). A checkpoint is written into a hidden
temp dir; after the barrier the main rank fsyncs every file, writes manifest.json (the size
of every file), renames the dir into place and only then replaces RUN/checkpoints/latest
(one line: the directory name). A crash at any point leaves the previous checkpoint and
pointer intact; a failed write removes its temp dir and says where and how much space it
needed. `find_checkpoint` takes the newest checkpoint whose files match its manifest and
warns about each damaged one it passes over. docs/ROBUSTNESS.md has the fault model.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import random
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from megatron_mgt.config import ConfigError, TrainConfig, resume_changes
from megatron_mgt.engine.base import TRAINER_STATE
from megatron_mgt.engine.optim import set_schedule_step
from megatron_mgt.fileio import write_text_atomic

LATEST = "latest"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
LOAD_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError)  # what a damaged .pt raises
OPTIMIZER_KEYS = ("train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.max_steps", "train.weight_decay", "train.beta1", "train.beta2")


class CheckpointError(ValueError):
    """A checkpoint that could not be written, verified or read; the message names the path."""


class RunLockedError(RuntimeError):
    """Another trainer holds the run directory."""


class RunLock:
    """An exclusive flock(2) on RUN/.lock, held for the run's life; the OS drops it when the
    process ends, however it ends. The file names the holder (pid, host, start time). Linux
    NFS clients map flock onto whole-file POSIX locks, which the server arbitrates across
    nodes; Lustre needs the `flock` mount option (without it flock fails and the run goes on
    unlocked, with a warning). docs/ROBUSTNESS.md section 1."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "a process that has not written its name yet"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another trainer ({holder}; lock {self.path}): wait for it or use another train.run_dir") from None
        except OSError as err:
            os.close(fd)
            print(f"mgt-train: warning: cannot lock {self.path} ({err.strerror}); running without a run-directory lock", file=sys.stderr)
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _seal(tmp: Path, trainer_state: dict) -> None:
    """trainer.pt, then fsync every file and dir under `tmp`, then manifest.json (every file's size)."""
    torch.save(trainer_state, tmp / TRAINER_STATE)
    files = _files(tmp)
    for path in files + sorted({p.parent for p in files}):
        _fsync(path)
    manifest = {"files": {str(p.relative_to(tmp)): p.stat().st_size for p in files}}
    write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _write_error(root: Path, name: str, err: BaseException | None) -> CheckpointError:
    """How much a checkpoint needs (the newest complete one's size) against what is free."""
    previous = complete_checkpoints(root)
    needed = sum(p.stat().st_size for p in _files(previous[-1])) if previous else 0
    free = shutil.disk_usage(root).free
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < needed
    cause = f"{type(err).__name__}: {err}" if err is not None else "another rank failed to write its files"
    return CheckpointError(
        f"checkpoint {root / name} could not be written{' (disk full: ENOSPC)' if full else ''}: {cause}. "
        f"{_size(free)} free on that filesystem, a checkpoint needs about {_size(needed)} (the last one's size). "
        f"The partial files were removed; the last good checkpoint is {previous[-1] if previous else 'none'}."
    )


def save_checkpoint(
    root: Path,
    step: int,
    write_files: Callable[[Path], None],
    trainer_state: dict,
    keep: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    any_rank: Callable[[bool], bool] = lambda flag: flag,
) -> Path:
    """Write a checkpoint for `step` under `root` atomically and point `latest` at it.

    `write_files(dir)` writes the engine's files into the temp dir; it runs on every rank
    (call this function on every rank, with the engine's `barrier` and `any_rank`). Only the
    main rank writes trainer.pt and the manifest, renames and moves the pointer. A failure on
    any rank removes the temp dir on all and raises CheckpointError. `keep > 0` prunes all but
    the newest `keep` checkpoints after the pointer has moved (prune_checkpoints: renamed
    away at once, deleted in the background)."""
    name = f"step_{step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    if is_main:
        wait_for_pruning(root)  # the previous prune's space is free before this checkpoint needs it
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    for stage in (lambda: write_files(tmp), lambda: is_main and _seal(tmp, trainer_state)):
        error = None
        try:
            stage()
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError (inline_container.cc)
            error = err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if any_rank(error is not None):
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            failure, cause = _write_error(root, name, error), error
            while cause is not None:  # the frames of the failed write hold the deleted file open, and its space with it
                cause.__traceback__, cause = None, cause.__context__
            raise failure from error
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
        write_text_atomic(root / LATEST, name + "\n")
        if keep > 0:
            prune_checkpoints(root, keep, current=final)
    barrier()
    return final


TRASH_SUFFIX = ".trash"
_pruning: dict[Path, threading.Thread] = {}  # checkpoint root -> the thread deleting its pruned checkpoints


def prune_checkpoints(root: Path, keep: int, current: Path | None = None) -> list[Path]:
    """All but the newest `keep` complete checkpoints (and never `current`, the one `latest`
    points at, which may be older after a resume from an explicit one) leave `root` now:
    renamed to hidden .step_N.trash dirs, one metadata operation each, and deleted by a
    background thread, so neither the barrier after a save nor the next training steps wait
    for rmtree of a ~190 GB checkpoint. A checkpoint that cannot be renamed stays, with a
    warning (pruning never fails a save). Returns the trash dirs."""
    wait_for_pruning(root)
    trash = []
    for old in complete_checkpoints(root)[:-keep]:
        if current is not None and old == current:
            continue
        target = old.with_name(f".{old.name}{TRASH_SUFFIX}")
        try:
            shutil.rmtree(target, ignore_errors=True)
            os.rename(old, target)
        except OSError as err:
            _stderr_warning(f"could not prune checkpoint {old} ({err}); it stays")
            continue
        trash.append(target)
    delete_in_background(root, trash)
    return trash


def delete_in_background(root: Path, paths: list[Path]) -> None:
    """rmtree `paths` in a thread registered under `root` (wait_for_pruning joins it); not a
    daemon, so the interpreter finishes the deletion before it exits. What cannot be deleted
    is left with a warning (remove_stale_temps tries again at the next start)."""
    if not paths:
        return

    def delete() -> None:
        for path in paths:
            if sys.version_info >= (3, 12):
                shutil.rmtree(path, onexc=lambda _fn, p, err: _stderr_warning(f"could not delete {p}: {err}"))
            else:
                shutil.rmtree(path, onerror=lambda _fn, p, info: _stderr_warning(f"could not delete {p}: {info[1]}"))

    thread = threading.Thread(target=delete, name=f"prune {root}")
    thread.start()
    _pruning[root] = thread


def wait_for_pruning(root: Path | None = None) -> None:
    """Join the background deletion of `root`'s pruned checkpoints (every root: None)."""
    for key in [root] if root is not None else list(_pruning):
        thread = _pruning.pop(key, None)
        if thread is not None:
            thread.join()


def remove_stale_temps(root: Path) -> list[str]:
    """Temp dirs and pointer files of checkpoint writes (removed now), and pruned checkpoints
    not yet deleted (.step_N.trash, deleted in the background), that a killed process left
    behind (call it holding the run lock); returns their names."""
    if not root.is_dir():
        return []
    stale = sorted(root.glob(".step_*.tmp")) + sorted(root.glob(f".{LATEST}.tmp")) + sorted(root.glob(f".{LATEST}.*.tmp"))  # write_text_atomic's temp (older: no pid)
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    trash = sorted(root.glob(f".step_*{TRASH_SUFFIX}"))
    wait_for_pruning(root)
    delete_in_background(root, trash)  # a pruned checkpoint can be ~190 GB: not on the start-up path
    return [p.name for p in stale + trash]


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs that hold a trainer state, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file())


def verify_checkpoint(directory: Path) -> str | None:
    """None when every file of the manifest is there at its recorded size, else what is wrong.
    A checkpoint without a manifest (written before manifests, or by mgt-convert) passes."""
    if not (directory / MANIFEST).is_file():
        return None
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for rel, size in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} is {path.stat().st_size} bytes, the manifest says {size}"
    return None


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def find_checkpoint(root: Path, resume: str, warn: Callable[[str], None] = _stderr_warning) -> Path | None:
    """'none' -> None; 'auto' -> the `latest` pointer's checkpoint, else the newest complete
    dir, passing over (with a warning each) those that fail `verify_checkpoint`; None when
    there is none; anything else is a checkpoint dir that must exist and verify."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"train.resume={resume}: no {TRAINER_STATE} in that directory")
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    pointer = root / LATEST
    candidates = [root / pointer.read_text().strip()] if pointer.is_file() else []
    candidates = [p for p in candidates if (p / TRAINER_STATE).is_file()]
    candidates += [p for p in reversed(complete_checkpoints(root)) if p not in candidates]
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is damaged ({problem}); passing over it to an older one")
    if candidates:
        raise CheckpointError(f"{root}: no checkpoint verifies (see the warnings); move them aside or set train.resume=none to start over")
    return None


def load_trainer_state(directory: Path, rank: int = 0, world_size: int = 1) -> dict:
    """trainer.pt, with `rng` and `loader` replaced by this rank's own (rank_NNNNN.pt)
    when the checkpoint has one; a checkpoint from another world size (or converted)
    falls back to the main rank's and says so in `rank_state`."""
    own = directory / rank_state_name(rank)
    try:
        state = torch.load(directory / TRAINER_STATE, weights_only=False)
        mine = torch.load(own, weights_only=False) if own.is_file() else None
    except LOAD_ERRORS as err:
        raise CheckpointError(f"checkpoint {directory}: cannot read {TRAINER_STATE} / {own.name}: {err}") from err
    if mine is not None and mine.get("world_size") == world_size:
        state.update(rng=mine["rng"], loader=mine["loader"], rank_state="own")
    else:
        state["rank_state"] = "main"
    return state


def retune(scheduler: torch.optim.lr_scheduler.LambdaLR, train: TrainConfig) -> None:
    """After loading an optimizer saved under other hyperparameters: this run's lr, weight
    decay and betas (group 0 decays, group 1 does not: engine.optim.param_groups), at the
    loaded step of this run's schedule (the schedule's lambda already reads `train`)."""
    scheduler.base_lrs = [train.lr] * len(scheduler.base_lrs)
    for i, group in enumerate(scheduler.optimizer.param_groups):
        group.update(initial_lr=train.lr, weight_decay=train.weight_decay if i == 0 else 0.0, betas=(train.beta1, train.beta2))
    set_schedule_step(scheduler, scheduler.last_epoch)


class Checkpointer:
    """Everything a run needs to continue bit for bit, saved and restored as one: the
    engine's own files (every rank), trainer.pt (step, data position, RNG, config, train
    seconds, stability statistics) and each rank's rank_NNNNN.pt (its RNG and data position)."""

    def __init__(self, root: Path, engine, loader, monitor, config: dict, keep: int = 0):
        self.root, self.engine, self.loader, self.monitor, self.config, self.keep = root, engine, loader, monitor, config, keep

    def latest(self) -> Path | None:
        return find_checkpoint(self.root, "auto")

    def save(self, step: int, train_seconds: float) -> Path:
        engine, loader = self.engine, self.loader
        state = {
            "step": step,
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "config": self.config,
            "world_size": engine.world_size,
            "train_seconds": train_seconds,
        }
        if self.monitor is not None:
            state["stability"] = self.monitor.state_dict()

        def write_files(directory: Path) -> None:
            engine.save(directory)
            own = {"rank": engine.rank, "world_size": engine.world_size, "dp_rank": engine.dp_rank, "rng": rng_state(), "loader": loader.state_dict()}
            torch.save(own, directory / rank_state_name(engine.rank))

        any_rank = engine.any_rank if engine.world_size > 1 else (lambda flag: flag)
        return save_checkpoint(self.root, step, write_files, state, keep=self.keep, is_main=engine.is_main, barrier=engine.barrier, any_rank=any_rank)

    def restore(self, directory: Path) -> dict:
        """Engine, data position, RNG and monitor statistics from `directory`; returns the
        trainer state (step, train_seconds, rank_state) with `changes`, the config keys this
        run changed (config.resume_changes refuses the others before anything is loaded);
        changed optimizer keys take effect (`retune`). A rollback keeps the data positions
        the monitor has learnt to leave out since that checkpoint was written."""
        state = load_trainer_state(directory, self.engine.rank, self.engine.world_size)
        try:
            saved_cfg = state.get("config", {})
            saved_dp = max(1, int(state.get("world_size", 1)) // int(saved_cfg.get("parallel", {}).get("pipeline_stages", 1)))
            state["changes"] = resume_changes(saved_cfg, self.config, saved_dp, self.engine.dp_size)
        except ConfigError as err:
            raise ConfigError(f"cannot resume from {directory}: {err}") from None
        try:
            self.engine.load(directory)
        except LOAD_ERRORS as err:
            raise CheckpointError(f"checkpoint {directory}: the engine cannot load it: {type(err).__name__}: {err}") from err
        if any(key in OPTIMIZER_KEYS for key, _, _ in state["changes"]):
            retune(self.engine.scheduler, self.engine.cfg.train)
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        if self.monitor is not None and "stability" in state:
            skips, actions = set(self.monitor.skip_positions), self.monitor.actions
            self.monitor.load_state_dict(state["stability"])
            self.monitor.skip_positions |= skips
            self.monitor.actions = max(actions, self.monitor.actions)
        return state
