"""Atomic checkpoints and `resume=auto`.

Layout: RUN/checkpoints/step_00000100/{model.pt, optimizer.pt, trainer.pt} (the engine
writes its own files; the trainer writes trainer.pt: step, data position, RNG states,
config). A checkpoint is written into a hidden temp dir, renamed into place, and only
then is RUN/checkpoints/latest (one line: the directory name) replaced. A crash at any
point leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

LATEST = "latest"
TRAINER_STATE = "trainer.pt"


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


def save_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], trainer_state: dict, keep: int = 0) -> Path:
    """Write a checkpoint for `step` under `root` atomically and point `latest` at it.

    `write_files(dir)` writes the engine's files into the temp dir. `keep > 0` prunes
    all but the newest `keep` checkpoints after the pointer has moved."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_files(tmp)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_text_atomic(root / LATEST, name + "\n")
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
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


def load_trainer_state(directory: Path) -> dict:
    return torch.load(directory / TRAINER_STATE, weights_only=False)
