"""Where numbers go: a JSONL file in the run dir, wandb, and a progress bar.

Every record is a flat dict with `kind` ('train', 'valid', 'geometry', 'event', 'anomaly')
and `step`. Anomalies (megatron_mgt/stability.py) also go to RUN/anomalies.jsonl, the run's
anomaly log.

Every record is appended whole or not at all (a failed write is cut back to the last whole
line and raises MetricsError naming the file). A resumed run first drops a torn last line (a
writer killed mid-record) and moves the records of steps after its checkpoint, which it is
about to write again, to metrics.superseded.jsonl (and anomalies.superseded.jsonl).
"""

from __future__ import annotations

import contextlib
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


class MetricsError(ValueError):
    """A metrics file that cannot be appended to or read; the message names the file (and line)."""


def append_whole(fd: int, path: Path, data: bytes) -> None:
    """Append `data` to the file open as `fd`, or leave the file as it was and raise MetricsError."""
    start = os.lseek(fd, 0, os.SEEK_END)
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError as err:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise MetricsError(f"{path}: cannot append a record ({err.strerror}); the file still ends at its last whole line") from err


def drop_torn_tail(path: Path) -> int:
    """Cut a last line without its newline (a writer killed mid-record); the bytes dropped."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        try:
            json.loads(data[keep:])  # whole but for its newline: keep it
            f.write(b"\n")
            return 0
        except ValueError:
            f.truncate(keep)
    return len(data) - keep


def supersede(path: Path, step: int) -> int:
    """Move the records of steps after `step` from `path` to PATH.superseded.jsonl (a resumed
    run writes those steps again); the number moved."""
    if not path.is_file():
        return 0
    kept, later = [], []
    for number, line in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        (later if (_parse(line, path, number).get("step") or 0) > step else kept).append(line)
    if later:
        with open(path.with_suffix(".superseded.jsonl"), "ab") as f:
            f.writelines(later)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    return len(later)


class MetricsLog:
    """Appends records to RUN/metrics.jsonl and, if enabled, to wandb. `resume_step`: the
    step of the checkpoint a resumed run continues from; `repairs` says what opening changed."""

    def __init__(self, run_dir: Path, cfg: Config, device: str, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.anomaly_path = run_dir / ANOMALIES
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "provenance.json").write_text(json.dumps(provenance(device), indent=2))
        paths = (self.path, self.anomaly_path)
        self.repairs = {"torn_bytes_dropped": sum(drop_torn_tail(p) for p in paths)}
        if resume_step is not None:
            self.repairs["records_superseded"] = sum(supersede(p, resume_step) for p in paths)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
        line = (json.dumps(record) + "\n").encode()
        append_whole(self.fd, self.path, line)
        if record.get("kind") == "anomaly":
            fd = os.open(self.anomaly_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                append_whole(fd, self.anomaly_path, line)
            finally:
                os.close(fd)
        if self.wandb is not None:
            kind = record.get("kind", "train")
            self.wandb.log(wandb_scalars(record, kind), step=record.get("step"))

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        """PNG files as wandb images at `step` (nothing when wandb is off)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
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


def _parse(line: bytes, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise MetricsError(f"{path}:{number}: not a JSON record ({err}): {line[:80]!r}") from None
    if not isinstance(record, dict):
        raise MetricsError(f"{path}:{number}: a JSON {type(record).__name__}, not a record: {line[:80]!r}")
    return record


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    """The records of a JSONL metrics file (of one `kind`), in file order. A torn last line
    (its writer killed mid-record) is skipped with a warning on stderr; any other line that is
    not a JSON object raises MetricsError naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise MetricsError(f"{path}: cannot read ({err.strerror})") from err
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_parse(line, path, number))
        except MetricsError:
            if number < len(lines):
                raise
            print(f"warning: {path}:{number}: torn last line ({len(line)} bytes, no newline) skipped", file=sys.stderr)
    return [r for r in records if kind is None or r.get("kind") == kind]
