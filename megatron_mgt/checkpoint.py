"""Atomic checkpoints and `resume=auto`.

Layout: RUN/checkpoints/step_00000100/{model.pt, optimizer.pt, trainer.pt, rank_00000.pt}
(the engine writes its own files, docs/ENGINES.md lists them per engine; the trainer writes
trainer.pt: step, data position, RNG states, config, and every rank writes
rank_NNNNN.pt: its RNG states and data position). A checkpoint is written into a hidden
temp dir, renamed into place, and only then is RUN/checkpoints/latest (one line: the
directory name) replaced. A crash at any point leaves the previous checkpoint and
pointer intact. With several processes every rank writes into the same temp dir; the
main rank alone creates, renames and points, with barriers in between.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
TRAINER_STATE = "trainer.pt"


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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: Path,
    step: int,
    write_files: Callable[[Path], None],
    trainer_state: dict,
    keep: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write a checkpoint for `step` under `root` atomically and point `latest` at it.

    `write_files(dir)` writes the engine's files into the temp dir; it runs on every
    rank (call this function on every rank, with `barrier` the engine's). Only the main
    rank writes trainer.pt, renames and moves the pointer. `keep > 0` prunes all but the
    newest `keep` checkpoints after the pointer has moved."""
    name = f"step_{step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write_files(tmp)
    barrier()
    if is_main:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_text_atomic(root / LATEST, name + "\n")
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs that hold a trainer state, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file())


def find_checkpoint(root: Path, resume: str) -> Path | None:
    """'none' -> None; 'auto' -> the `latest` pointer, else the newest complete dir,
    else None; anything else is a checkpoint dir that must exist."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"train.resume={resume}: no {TRAINER_STATE} in that directory")
        return path
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(directory: Path) -> int:
    """The step recorded in a checkpoint's trainer.pt (0 when there is none)."""
    path = directory / TRAINER_STATE
    return int(torch.load(path, weights_only=False)["step"]) if path.is_file() else 0


def load_trainer_state(directory: Path, rank: int = 0, world_size: int = 1) -> dict:
    """trainer.pt, with `rng` and `loader` replaced by this rank's own (rank_NNNNN.pt)
    when the checkpoint has one; a checkpoint from another world size (or converted)
    falls back to the main rank's and says so in `rank_state`."""
    state = torch.load(directory / TRAINER_STATE, weights_only=False)
    own = directory / rank_state_name(rank)
    mine = torch.load(own, weights_only=False) if own.is_file() else None
    if mine is not None and mine.get("world_size") == world_size:
        state.update(rng=mine["rng"], loader=mine["loader"], rank_state="own")
    else:
        state["rank_state"] = "main"
    return state


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

        return save_checkpoint(self.root, step, write_files, state, keep=self.keep, is_main=engine.is_main, barrier=engine.barrier)

    def restore(self, directory: Path) -> dict:
        """Engine, data position, RNG and monitor statistics from `directory`; returns the
        trainer state (step, train_seconds, rank_state). A rollback keeps the data positions
        the monitor has learnt to leave out since that checkpoint was written."""
        self.engine.load(directory)
        state = load_trainer_state(directory, self.engine.rank, self.engine.world_size)
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        if self.monitor is not None and "stability" in state:
            skips, actions = set(self.monitor.skip_positions), self.monitor.actions
            self.monitor.load_state_dict(state["stability"])
            self.monitor.skip_positions |= skips
            self.monitor.actions = max(actions, self.monitor.actions)
        return state
