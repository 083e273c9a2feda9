"""Where numbers go: a JSONL file in the run dir, wandb, and a progress bar.

Every record is a flat dict with `kind` ('train', 'valid', 'geometry', 'event', 'anomaly')
and `step`. Anomalies (megatron_mgt/stability.py) also go to RUN/anomalies.jsonl, the run's
anomaly log.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from megatron_mgt.config import Config, to_dict

ANOMALIES = "anomalies.jsonl"
SLURM_VARS = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task": "SLURM_ARRAY_TASK_ID",
    "restart": "SLURM_RESTART_COUNT",
    "node": "SLURMD_NODENAME",
}
LIBRARIES = ("torch", "numpy", "deepspeed", "sentencepiece", "datasets", "wandb", "flash-attn")


def wandb_mode(requested: str) -> str:
    """'auto' -> $WANDB_MODE if set, else 'online' when an API key is configured, else 'offline'."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(Path.home() / ".netrc")
    return "online" if has_key else "offline"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) or "unknown"


def provenance(device: str) -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
        "libraries": versions,
        "slurm": {key: os.environ[var] for key, var in SLURM_VARS.items() if var in os.environ},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class MetricsLog:
    """Appends records to RUN/metrics.jsonl and, if enabled, to wandb."""

    def __init__(self, run_dir: Path, cfg: Config, device: str):
        self.path = run_dir / "metrics.jsonl"
        self.anomaly_path = run_dir / ANOMALIES
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "provenance.json").write_text(json.dumps(provenance(device), indent=2))
        self.file = open(self.path, "a")
        self.wandb = None
        mode = wandb_mode(cfg.log.wandb)
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.log.wandb_project,
                name=cfg.log.run_name or run_dir.name,
                group=cfg.log.wandb_group or None,
                dir=str(run_dir),
                mode=mode,
                config=to_dict(cfg),
                resume="allow",
                id=_wandb_id(run_dir),
            )

    def log(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        self.file.write(line)
        self.file.flush()
        if record.get("kind") == "anomaly":
            with open(self.anomaly_path, "a") as f:
                f.write(line)
        if self.wandb is not None:
            kind = record.get("kind", "train")
            self.wandb.log(wandb_scalars(record, kind), step=record.get("step"))

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        """PNG files as wandb images at `step` (nothing when wandb is off)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class NullLog:
    """What ranks other than the main one log to: nothing."""

    wandb = None

    def log(self, record: dict) -> None:
        pass

    def log_images(self, step: int, images: dict) -> None:
        pass

    def close(self) -> None:
        pass


def wandb_scalars(record: dict, kind: str) -> dict:
    """'kind/key' for every number of a record; a list of numbers (per layer) becomes one
    scalar per entry, 'kind/key/003' (None entries are skipped)."""
    out = {}
    for key, value in record.items():
        if key in ("kind", "step") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{kind}/{key}"] = value
        elif isinstance(value, list):
            out.update({f"{kind}/{key}/{i:03d}": v for i, v in enumerate(value) if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run dir, so a resumed job continues the same run."""
    path = run_dir / "wandb_id"
    if not path.is_file():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
