"""`mgt-experiment ... --status`: what a campaign (or one experiment) still has to train.

The grid is walked in report-only mode (the runners' own logic: sweeps, their edge
extensions, each arm's seeds at its chosen lr), so the list is exactly what a rerun would
train next, except that a sweep with an unfinished point hides its edge extensions and the
seeds at its chosen lr (named as an open sweep: the count is a lower bound; every point of
its initial grid is listed). Runs another runner holds are marked
running with their last logged step. The time estimate is, per run, the median wall time of
the finished runs of the same arm and depth (archive and pool; only those timed on this
machine's CPU model where there are any), else of that arm at the nearest finished depth
scaled by depth; total / workers. Wall times were measured with the
campaign's own concurrency, so they already include its sharing of the cores.

`--deadline` uses the same estimate to size a chunk to a session: a runner starts (or
resumes) a run only if its estimate, scaled by the steps it has left and by EVAL_MARGIN for
the held-out evaluation, ends by the deadline; runs that would not are left for the next
chunk, and the reports are written as `--report-only` writes them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from megatron_mgt.checkpoint import find_checkpoint
from megatron_mgt.config import Config, ConfigError
from megatron_mgt.experiments import common
from megatron_mgt.experiments.common import arm_depth
from megatron_mgt.flops import cpu_model
from megatron_mgt.metrics import read_metrics


def finished_walls(dirs: list[Path], cpu: str | None = None) -> dict[tuple[str, int], list[float]]:
    """{(arm, depth): wall seconds of every finished run} under `dirs` (run_info.json + eval/eval.json),
    each run once (a run in both the pool and the archive is one run). With `cpu` (flops.cpu_model),
    an (arm, depth) that has runs timed on that CPU (run_info's "cpu") keeps only those: walls
    from another machine say little about this one's."""
    found: dict[tuple[str, int], list[tuple[float, str | None]]] = {}
    seen: set[str] = set()
    for root in dirs:
        if not root.is_dir():
            continue
        for run in root.iterdir():
            key, info = arm_depth(run.name), run / "run_info.json"
            if key and run.name not in seen and info.is_file() and (run / "eval" / "eval.json").is_file():
                seen.add(run.name)
                try:
                    record = json.loads(info.read_text())
                    found.setdefault(key, []).append((float(record["wall_seconds"]), record.get("cpu")))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
    return {key: [w for w, c in timed if cpu is not None and c == cpu] or [w for w, _ in timed] for key, timed in found.items()}


def estimate_seconds(arm: str, depth: int, walls: dict[tuple[str, int], list[float]]) -> float | None:
    """Median wall of (arm, depth); else the arm's nearest finished depth scaled by depth; else None."""
    if walls.get((arm, depth)):
        return statistics.median(walls[(arm, depth)])
    known = [d for (a, d) in walls if a == arm and d > 0]
    if not known or depth == 0:
        return None
    nearest = min(known, key=lambda d: abs(d - depth))
    return statistics.median(walls[(arm, nearest)]) * depth / nearest


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's last complete checkpoint (where a resume starts), 0 without one."""
    ckpt = find_checkpoint(run_dir / "checkpoints", "auto")
    return int(ckpt.name.split("_")[1]) if ckpt is not None else 0


def running_step(pool: Path, name: str) -> int | None:
    """The last logged train step of a run another process holds (its pool lock is taken), else None."""
    lock = pool / f".{name}.lock"
    if not lock.is_file():
        return None
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            metrics = pool / name / "metrics.jsonl"
            steps = [r["step"] for r in read_metrics(metrics, "train")] if metrics.is_file() else []
            return steps[-1] if steps else 0
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def summary(steps: list[tuple[str, dict[str, tuple[str, int, int]], list[str]]], pool: Path, archive: Path | None, workers: int) -> str:
    """The status text. `steps`: (step title, {run: (arm, depth, max_steps)} not finished, open
    sweeps) in campaign order; a run counts once, at the first step that needs it."""
    walls = finished_walls([p for p in (archive, pool) if p is not None], cpu_model())
    seen: set[str] = set()
    lines, total, unknown, n_todo = [], 0.0, 0, 0
    for title, todo, open_sweeps in steps:
        new = {n: ad for n, ad in todo.items() if n not in seen}
        seen.update(new)
        running = {n: running_step(pool, n) for n in new}
        n_running = sum(step is not None for step in running.values())
        lines.append(f"{title}: {len(new)} runs to train ({n_running} running)" + (f"; sweeps still open: {', '.join(sorted(set(open_sweeps)))}" if open_sweeps else ""))
        for name, (arm, depth, max_steps) in new.items():
            est = estimate_seconds(arm, depth, walls)
            done = running[name] if running[name] is not None else checkpoint_step(pool / name)
            left = max(0.0, 1.0 - done / max_steps) if max_steps else 1.0
            state = f"running, step {running[name]}" if running[name] is not None else f"to resume from step {done}" if done else "to train"
            lines.append(f"  {name}: {state}" + (f", ~{est * left / 60:.0f} min" if est is not None else ", no estimate"))
            if est is None:
                unknown += 1
            else:
                total += est * left
        n_todo += len(new)
    bound = " (at least: open sweeps add points and their seeds)" if any(s for _, _, s in steps) else ""
    lines.append(f"total: {n_todo} runs to train{bound}; about {total / 3600 / max(workers, 1):.1f} h with {workers} worker(s)"
                 + (f", {unknown} run(s) without an estimate" if unknown else "")
                 + " (median wall of finished runs per arm and depth)")
    return "\n".join(lines)


EVAL_MARGIN = 1.1  # archived walls time training only; the evaluation after it adds a few percent (~1 min of ~14 at 96 layers)
EVOLUTION_POINT_MARGIN = 0.01  # one evolution point (8 held-out batches, 64 rank windows) is about a tenth of the full-split evaluation


def parse_deadline(text: str, now: dt.datetime | None = None) -> float:
    """`--deadline` as epoch seconds: '+90' or '+90m' (minutes from now), '+2h', 'HH:MM' (its
    next occurrence in local time, as at(1) reads it: '00:25' at 22:15 is tomorrow's, but one
    passed less than an hour ago is an error) or an ISO date-time ('2026-12-07T15:05'; one
    already past is an error)."""
    now = now or dt.datetime.now()
    text = text.strip()
    rel = re.fullmatch(r"\+(\d+(?:\.\d+)?)([mh]?)", text)
    if rel:
        return now.timestamp() + float(rel[1]) * (3600 if rel[2] == "h" else 60)
    clock = re.fullmatch(r"\d{1,2}:\d{2}", text)
    try:
        at = dt.datetime.combine(now.date(), dt.time.fromisoformat(text.zfill(5))) if clock else dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--deadline {text!r}: expected +MINUTES, +HOURSh, HH:MM or YYYY-MM-DDTHH:MM") from None
    if clock:  # its next occurrence
        if now - dt.timedelta(hours=1) < at < now:  # most likely a slip, not tomorrow's
            raise ConfigError(f"--deadline {text}: passed {(now - at).seconds // 60} min ago; for tomorrow's give {at + dt.timedelta(days=1):%Y-%m-%dT%H:%M}")
        return (at if at >= now else at + dt.timedelta(days=1)).timestamp()
    if at.tzinfo is not None:  # '...T15:05Z' or '+01:00': compared in its own zone
        now = now.astimezone(at.tzinfo) if now.tzinfo else now.astimezone().astimezone(at.tzinfo)
    if at < now:
        raise ConfigError(f"--deadline {text}: {at:%Y-%m-%d %H:%M} has passed (now {now:%Y-%m-%d %H:%M}); give a later time or +MINUTES")
    return at.timestamp()


def deadline_gate(deadline: float, clock: Callable[[], float] = time.time) -> Callable[[str, Config, Path, bool], bool]:
    """may_start(name, cfg, run_dir, evolution) for common.START_GATE: does the run's remaining
    work end by `deadline`? now + estimate x [(1 - steps done / max_steps) + (EVAL_MARGIN - 1)
    + (checkpoints saved + 1) x EVOLUTION_POINT_MARGIN with `evolution`] <= deadline, the
    estimate from the finished runs of the archive and of the run's pool at the time of asking
    (so each run that finishes refines it); a run without an estimate starts only before the
    deadline."""

    def may_start(name: str, cfg: Config, run_dir: Path, evolution: bool = False) -> bool:
        key = arm_depth(name)
        est = estimate_seconds(*key, finished_walls([d for d in (common.ARCHIVE, run_dir.parent) if d is not None], cpu_model())) if key else None
        if est is None:
            return clock() < deadline
        done = checkpoint_step(run_dir) / cfg.train.max_steps if cfg.train.max_steps else 0.0
        share = max(0.0, 1.0 - done) + (EVAL_MARGIN - 1.0)  # the held-out evaluation is owed even when training is done
        if evolution:
            share += ((cfg.train.max_steps // cfg.train.save_every if cfg.train.save_every else 1) + 1) * EVOLUTION_POINT_MARGIN
        return clock() + est * share <= deadline

    return may_start
