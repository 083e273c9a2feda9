"""What every protocol runner shares: experiment presets, the run pool, one run end to end
(statistics: megatron_mgt/stats.py; tables and results files: experiments/report.py).

An experiment preset (configs/experiments/*.yaml) is a small YAML mapping:

    base: base_cpu.yaml            # a training preset (Config), relative to this file
    out: runs/experiments/NAME     # results.json / results.md / PNGs
    pool: runs/cpu_pool            # where the training runs live (shared between experiments)
    overrides: {train.max_steps: 120}   # dotted Config overrides for every run of the grid
    grid: {variants: [...], depths: [...], seeds: [...], ...}   # read by the runner

A run is named `{residual}_L{layers}_s{seed}[_{tag}]_{hash}`, the hash over every config
value that differs from the defaults (paths, logging and thread count excluded), so two
experiments that ask for the same run share it, and a changed setting never reuses a
stale one. A run is finished when it has a checkpoint at max_steps and eval/eval.json
(or a `diverged.json` marker); finished runs are skipped, interrupted ones resume
(train.resume=auto). A per-run lock lets two runners share a pool concurrently.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_mgt.checkpoint import complete_checkpoints, find_checkpoint
from megatron_mgt.config import Config, ConfigError, deep_update, derive, merge, override_text, parse_override, read_yaml, to_dict, validate
from megatron_mgt.data.indexed import IndexedDataset
from megatron_mgt.data.loader import eval_batches
from megatron_mgt.engine.dist import resolve_device
from megatron_mgt.evaluate import evaluate, load_model, rank_probe
from megatron_mgt.fileio import write_text_atomic
from megatron_mgt.flops import cpu_model, flops_per_token, matmul_params
from megatron_mgt.geometry import geometry_snapshot, rank_profile
from megatron_mgt.metrics import read_metrics
from megatron_mgt.model import Transformer, capture_geometry, lm_loss
from megatron_mgt.model.residual import RESIDUAL_RULES
from megatron_mgt.stats import DECISION_RULES
from megatron_mgt.train import TrainingDiverged, heldout_loss, train

PAPER_VARIANTS = ("preln", "postln", "deepnorm", "mhc", "ddl", "mgt")
COMPARATORS = ("ddl_rank1", "mhc_nstream")  # used when registered in RESIDUAL_RULES at run time
# Config keys that do not change what a run computes (excluded from the run hash).
_VOLATILE = (
    "train.run_dir",
    "train.threads",
    "train.cpu_malloc",
    "train.resume",
    "train.exit_at_step",
    "train.exit_after_minutes",
    "train.device",
    "log.",
)


@dataclass
class Experiment:
    """A loaded experiment preset: training config, grid and output locations."""

    name: str
    base: Config
    out: Path
    pool: Path
    grid: dict = field(default_factory=dict)
    decision: dict = field(default_factory=dict)  # the decision rule, fixed in the preset before any run
    archive: Path | None = None  # finished runs' records in the repo (archive_run)

    @property
    def rule(self) -> str:
        """The declared decision rule (stats.DECISION_RULES), default ci_excludes_zero."""
        return self.decision.get("rule", DECISION_DEFAULTS["rule"])

    @property
    def level(self) -> float:
        """The confidence level of every interval the runners report, default 0.95."""
        return float(self.decision.get("level", DECISION_DEFAULTS["level"]))


def load_experiment(
    name: str, preset: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None, pool: str | Path | None = None
) -> Experiment:
    """Read an experiment preset. Overrides `grid.key=value` change the grid, anything else
    is a dotted Config override applied to every run."""
    path = Path(preset)
    if not path.is_file():
        raise ConfigError(f"experiment preset not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    allowed = ("experiment", "base", "out", "pool", "archive", "overrides", "grid", "decision")
    unknown = set(spec) - set(allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown experiment keys {sorted(unknown)} (allowed: {', '.join(allowed)})")
    if spec.get("experiment", name) != name:
        raise ConfigError(f"{path} is a preset for experiment '{spec['experiment']}', not '{name}'")
    cfg = Config()
    if spec.get("base"):
        merge(cfg, read_yaml(path.parent / spec["base"]))
    grid = dict(spec.get("grid") or {})
    run_overrides = [override_text(k, v) for k, v in (spec.get("overrides") or {}).items()]
    for text in list(run_overrides) + list(overrides):
        if text.startswith("grid."):
            deep_update(grid, parse_override(text)["grid"])  # grid.tuning.points=6 keeps the other tuning keys
        else:
            merge(cfg, parse_override(text))
    validate(cfg)
    decision = spec.get("decision") or {}
    if not isinstance(decision, dict):
        raise ConfigError(f"{path}: decision must be a mapping (rule:, level:), got {decision!r}")
    check_decision(decision, path)
    return Experiment(
        name=name,
        base=cfg,
        out=Path(out or spec.get("out") or f"runs/experiments/{name}"),
        pool=Path(pool or spec.get("pool") or "runs/pool"),
        grid=grid,
        decision=dict(decision),
        archive=Path(spec["archive"]) if spec.get("archive") else None,
    )


DECISION_DEFAULTS = {"rule": "ci_excludes_zero", "level": 0.95}  # a preset's decision block, where it omits a key


def check_decision(decision: dict, path: Path) -> None:
    """The preset's decision block: keys rule (stats.DECISION_RULES) and level in (0, 1);
    checked at load, before anything trains."""
    unknown = set(decision) - set(DECISION_DEFAULTS)
    if unknown:
        raise ConfigError(f"{path}: unknown decision keys {sorted(unknown)} (allowed: {', '.join(DECISION_DEFAULTS)})")
    rule = decision.get("rule", DECISION_DEFAULTS["rule"])
    if rule not in DECISION_RULES:
        raise ConfigError(f"{path}: decision.rule={rule!r} is not a known rule ({', '.join(sorted(DECISION_RULES))})")
    level = decision.get("level", DECISION_DEFAULTS["level"])
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ConfigError(f"{path}: decision.level={level!r} must be a number in (0, 1), e.g. 0.95")


def variants_for(requested: Iterable[str]) -> list[str]:
    """The requested variants that are registered, plus the comparators if 'comparators' is
    listed and they are registered now (another module may add them at run time)."""
    out = []
    for name in requested:
        if name == "comparators":
            out += [c for c in COMPARATORS if c in RESIDUAL_RULES]
        elif name in RESIDUAL_RULES:
            out.append(name)
        else:
            raise ConfigError(f"grid.variants: '{name}' is not a residual rule ({', '.join(RESIDUAL_RULES)}), 'comparators' or an arm of experiments/arms.py")
    return out


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_key(cfg: Config) -> dict:
    """The settings that make a run what it is: values that differ from the defaults, minus volatile keys."""
    defaults = _flatten(to_dict(Config()))
    return {k: v for k, v in sorted(_flatten(to_dict(cfg)).items()) if defaults.get(k) != v and not k.startswith(_VOLATILE)}


def run_name(cfg: Config, tag: str = "") -> str:
    digest = hashlib.sha1(json.dumps(config_key(cfg), sort_keys=True, default=str).encode()).hexdigest()[:6]
    m = cfg.model
    return f"{m.residual}_L{m.n_layers}_s{cfg.train.seed}{'_' + tag if tag else ''}_{digest}"


RUN_NAME = re.compile(r"^(?P<residual>.+?)_L(?P<depth>\d+)_s(?P<seed>\d+)_(?:(?P<tag>.+)_)?(?P<digest>[0-9a-f]{6})$")


def arm_depth(name: str) -> tuple[str, int] | None:
    """(arm, depth) of a run_name (the tag names special arms); None for any other name."""
    m = RUN_NAME.match(name)
    return (m["tag"] or m["residual"], int(m["depth"])) if m else None


class RunStopped(RuntimeError):
    """A run's training ended before max_steps (a signal, train.exit_at_step): its checkpoint
    is saved and the same command resumes it."""


@dataclass
class RunOutcome:
    """One run of a grid, as the runners consume it."""

    name: str
    run_dir: Path
    cfg: Config
    status: str  # finished | diverged
    trained_now: bool
    eval: dict | None  # eval/eval.json (None if diverged before any checkpoint)
    info: dict  # run_info.json: wall seconds, tokens, divergence message
    tag: str = ""  # the arm of a special run (experiments/arms.py), else ""

    @property
    def arm(self) -> str:
        """The arm the run belongs to: its tag for a special arm, else its residual rule."""
        return self.tag or self.cfg.model.residual

    @property
    def valid_loss(self) -> float:
        """Held-out loss: every token of the valid split when mgt-eval scored it
        (eval.full_split), else its first eval.batches batches; nan unless finished."""
        if not (self.eval and self.status == "finished"):
            return math.nan
        full = (self.eval.get("splits") or {}).get("valid")
        return full["loss"] if full else self.eval["valid"]["loss"]


ARCHIVE: Path | None = None  # set from the preset's `archive:` (cli): finished runs' records, committed with the results
# eval.json and diverged.json mark an archived run as done (_archived), so they are copied last
ARCHIVED = ("config.yaml", "run_info.json", "metrics.jsonl", "anomalies.jsonl", "eval/evolution.json", "eval/eval.json", "diverged.json")


def archive_run(run_dir: Path, archive: Path) -> None:
    """Copy a finished run's small records (no checkpoints, no geometry telemetry lines) to
    archive/NAME, so a later session on a new machine (where runs/ is gone) counts the run as
    done instead of training it again."""
    dest = archive / run_dir.name
    for rel in ARCHIVED:
        src = run_dir / rel
        if not src.is_file():
            continue
        text = src.read_text()
        if rel == "metrics.jsonl":
            text = "".join(line for line in text.splitlines(keepends=True) if '"kind": "geometry"' not in line)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(dest / rel, text)


def _archived(name: str) -> Path | None:
    if ARCHIVE is None:
        return None
    d = ARCHIVE / name
    return d if (d / "eval" / "eval.json").is_file() or (d / "diverged.json").is_file() else None


def tokens_per_step(cfg: Config) -> int:
    """Training tokens per optimizer step of a single-process run: micro batch x accumulation x sequence."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len


def record_dir(pool: Path, name: str) -> Path:
    """Where run `name`'s records are: the pool's run if it has its metrics, else the archive's copy."""
    archived = _archived(name)
    return archived if archived is not None and not (pool / name / "metrics.jsonl").is_file() else pool / name


def _is_finished(run_dir: Path, cfg: Config) -> bool:
    if (run_dir / "diverged.json").is_file():
        return True
    ckpt = find_checkpoint(run_dir / "checkpoints", "auto")
    return ckpt is not None and ckpt.name == f"step_{cfg.train.max_steps:08d}" and (run_dir / "eval" / "eval.json").is_file()


def ensure_run(
    cfg: Config, pool: Path, tag: str = "", evolution: bool = False, progress: bool = True, report_only: bool = False, wait: bool = True
) -> RunOutcome | None:
    """Train (or resume) and evaluate one run in the pool unless it is finished; with
    `evolution`, also the geometry of every kept checkpoint (eval/evolution.json; not for a
    diverged run). With `report_only`, nothing is computed or written and no lock is taken:
    a run with work left comes back with status 'missing'; so does a run (or evolution) that
    START_GATE refuses (`--deadline`), asked again after waiting for another runner's lock.
    A run another process holds is waited for, or with `wait=False` left (None returned).
    A finished run not yet in the archive is archived."""
    name = run_name(cfg, tag)
    run_dir = pool / name
    cfg = derive(cfg, {"train.run_dir": str(run_dir), "train.resume": "auto", "log.progress": progress})
    archived = _archived(name)
    if archived is not None and not _is_finished(run_dir, cfg) and (not evolution or (archived / "eval" / "evolution.json").is_file()):
        return _outcome(name, archived, cfg, trained_now=False, tag=tag)
    missing = RunOutcome(name=name, run_dir=run_dir, cfg=cfg, status="missing", trained_now=False, eval=None, info={}, tag=tag)

    def evolution_left() -> bool:
        return evolution and not (run_dir / "diverged.json").is_file() and not (run_dir / "eval" / "evolution.json").is_file()

    def work_left() -> bool:
        return not _is_finished(run_dir, cfg) or evolution_left()

    def refused() -> bool:
        return START_GATE is not None and work_left() and not START_GATE(name, cfg, run_dir, evolution)

    if report_only:
        return missing if work_left() else _outcome(name, run_dir, cfg, trained_now=False, tag=tag)
    if refused():
        return missing
    run_dir.mkdir(parents=True, exist_ok=True)
    trained_now = False
    with open(pool / f".{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))  # another runner on the same pool has it
        except BlockingIOError:
            return None
        if refused():  # the wait may have run past the deadline
            return missing
        if not _is_finished(run_dir, cfg):
            trained_now = True
            t0 = time.monotonic()
            info = read_json(run_dir / "run_info.json") or {"wall_seconds": 0.0}

            here = cpu_model()
            cpu = here if info["wall_seconds"] == 0 or info.get("cpu") == here else "mixed"  # segments timed on two machines

            def add_wall(**extra) -> None:  # every training segment counts, an interrupted one too
                info.update(wall_seconds=info["wall_seconds"] + time.monotonic() - t0, cpu=cpu, **extra)
                write_json(run_dir / "run_info.json", info)

            try:
                result = train(cfg)
            except TrainingDiverged as err:
                add_wall(diverged=str(err))
                write_json(run_dir / "diverged.json", {"message": str(err)})
            except BaseException:  # Ctrl-C, a kill that Python sees, a crash: the segment still cost its time
                add_wall()
                raise
            else:
                if result.status != "finished":
                    add_wall()
                    raise RunStopped(f"{name}: training stopped early ({result.status}); run the experiment again to resume")
                add_wall(tokens=cfg.train.max_steps * tokens_per_step(cfg))
                evaluate(cfg, run_dir)
        if evolution_left():
            write_json(run_dir / "eval" / "evolution.json", checkpoint_evolution(cfg, run_dir))
        if ARCHIVE is not None and _is_finished(run_dir, cfg):  # also a run finished before a crash, or before `archive:` was set
            evolution_missing = (run_dir / "eval" / "evolution.json").is_file() and not (ARCHIVE / name / "eval" / "evolution.json").is_file()
            if trained_now or _archived(name) is None or evolution_missing:
                archive_run(run_dir, ARCHIVE)
    return _outcome(name, run_dir, cfg, trained_now, tag)


def _outcome(name: str, run_dir: Path, cfg: Config, trained_now: bool, tag: str) -> RunOutcome:
    diverged = (run_dir / "diverged.json").is_file()
    return RunOutcome(
        name=name,
        run_dir=run_dir,
        cfg=cfg,
        status="diverged" if diverged else "finished",
        trained_now=trained_now,
        eval=read_json(run_dir / "eval" / "eval.json"),
        info=read_json(run_dir / "run_info.json") or {},
        tag=tag,
    )


@torch.no_grad()
def checkpoint_evolution(cfg: Config, run_dir: Path) -> dict:
    """Geometry (per-layer erank, token cosine, per-sublayer beta stats) and held-out loss
    (train.eval_batches batches) at init and at every kept checkpoint; with eval.rank_windows,
    also the collapse-robust rank profile (geometry.rank_profile) on that many windows spread
    over the valid split, the same probe as the final evaluation's."""
    device = resolve_device(cfg.train.device)
    probe, _ = next(iter(eval_batches(cfg.data.valid_prefix, cfg.data.seq_len, cfg.eval.geometry_batch, 1)))
    probe = probe.to(device)
    windows = rank_probe(cfg, device) if cfg.eval.rank_windows else None

    def record(model, step: int) -> dict:
        loss = heldout_loss(
            lambda x, y: lm_loss(model(x.to(device)), y.to(device)).item(), cfg.data.valid_prefix, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches
        )
        point = {"step": step, "valid_loss": loss["loss"], **geometry_snapshot(model, probe, cfg.eval.center, cfg.eval.spectrum)}
        if windows is not None:
            point["rank_profile"] = rank_profile(capture_geometry(model, windows)["hidden"], cfg.eval.center)
        return point

    torch.manual_seed(cfg.train.seed)
    points = [record(Transformer(cfg.model).to(device).eval(), 0)]
    for ckpt in complete_checkpoints(run_dir / "checkpoints"):
        points.append(record(load_model(cfg, ckpt, device), int(ckpt.name.split("_")[1])))
    return {"centered": cfg.eval.center, "points": points}


def train_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    return [(r["step"], r["loss"]) for r in read_metrics(path, "train")] if path.is_file() else []


REPORT_ONLY = False  # set by `mgt-experiment --report-only`: tabulate finished runs, train nothing
QUIET = False  # set by `mgt-experiment --status`: no progress bars or per-run notes (its summary says it all)
# set by `mgt-experiment --deadline` (status.deadline_gate): may_start(name, cfg, run_dir, evolution) -> False
# leaves a run's remaining work (training, evaluation, evolution) undone, as report-only would
START_GATE: Callable[[str, Config, Path, bool], bool] | None = None
NOT_FINISHED: dict[str, tuple[str, int, int]] = {}  # report-only or past --deadline: {run: (arm, depth, max_steps)} a grid needs, unfinished (`--status`)
OPEN_SWEEPS: list[str] = []  # report-only or past --deadline: "arm@depth" of lr sweeps with an unfinished point (their extensions are not known yet)


def run_grid(specs: Sequence[tuple[Config, str]], pool: Path, desc: str, evolution: bool = False, wait_for_held: bool = True) -> list[RunOutcome]:
    """ensure_run over (config, tag) pairs with a progress bar over runs. Runs that another
    runner on the same pool is training are passed over first and waited for at the end, so
    several runners (the tasks of slurm/experiment.sh) split a grid between them; with
    `wait_for_held=False` they are not waited for (nor returned): the caller has other work
    that does not need them. In report-only mode, runs that are not finished are left out
    (with a note)."""
    outcomes: dict[int, RunOutcome] = {}
    bar = tqdm(total=len(specs), desc=desc, unit="run", dynamic_ncols=True, disable=QUIET)
    for wait in (False, True) if wait_for_held else (False,):
        for i, (cfg, tag) in enumerate(specs):
            if i in outcomes:
                continue
            bar.set_postfix_str(run_name(cfg, tag))
            outcome = ensure_run(cfg, pool, tag, evolution=evolution, report_only=REPORT_ONLY, wait=wait)
            if outcome is not None:
                outcomes[i] = outcome
                bar.update(1)
    if len(outcomes) < len(specs):  # the bar ends short of its total: say why
        bar.set_postfix_str(f"{len(specs) - len(outcomes)} held by another runner, left to it")
    bar.close()
    kept = []
    for i in range(len(specs)):
        if i not in outcomes:  # held by another runner, not waited for
            continue
        if outcomes[i].status == "missing":
            o = outcomes[i]
            NOT_FINISHED[o.name] = (o.arm, o.cfg.model.n_layers, o.cfg.train.max_steps)
            if not QUIET:
                tqdm.write(f"[{desc}] {outcomes[i].name}: not finished, left out (report-only or past --deadline)")
        else:
            kept.append(outcomes[i])
    return kept


def valid_curve(o: RunOutcome, flops_per_token_: float) -> list[dict]:
    """The run's held-out losses during training, each with the training tokens, FLOPs and
    train seconds (from the train record of that step, when one was logged) spent by then."""
    path = o.run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    seconds = {r["step"]: r.get("train_seconds") for r in read_metrics(path, "train")}
    per_step = tokens_per_step(o.cfg)
    return [
        {"step": r["step"], "loss": r["loss"], "tokens": r["step"] * per_step, "flops": r["step"] * per_step * flops_per_token_, "seconds": seconds.get(r["step"])}
        for r in read_metrics(path, "valid")
    ]


def last_layer_ranks(profile: dict | None) -> dict:
    """The collapse-robust rank metrics of the last layer of a rank profile (evaluate.rank_profiles)."""
    if not profile:
        return {}
    out = {f"{name}_last": values["mean"][-1] for name, values in profile["metrics"].items()}
    out["collapsed_last"] = profile["collapsed"][-1]
    return out


def run_summary(o: RunOutcome) -> dict:
    """The per-run numbers every results.json carries."""
    geo = (o.eval or {}).get("geometry") or {}
    init = (o.eval or {}).get("geometry_at_init") or {}
    curve = train_curve(o.run_dir)
    tokens = o.info.get("tokens")
    train_tokens = IndexedDataset(o.cfg.data.train_prefix).num_tokens if o.cfg.data.train_prefix else 0
    with torch.device("meta"):
        per_token = flops_per_token(o.cfg.model, matmul_params(Transformer(o.cfg.model)), o.cfg.data.seq_len)
    return {
        "lr": o.cfg.train.lr,
        "d_ff": o.cfg.model.ffn_dim,
        "valid_scope": "every token" if ((o.eval or {}).get("splits") or {}).get("valid") else f"first {o.cfg.eval.batches} batches",
        "epochs": tokens / train_tokens if tokens and train_tokens else None,
        "flops": per_token * tokens if tokens else None,
        "valid_curve": valid_curve(o, per_token),
        **last_layer_ranks((o.eval or {}).get("rank_profile")),
        "rank_by_layer": {k: v["mean"] for k, v in (((o.eval or {}).get("rank_profile") or {}).get("metrics") or {}).items()},
        "rank_by_layer_init": {k: v["mean"] for k, v in (((o.eval or {}).get("rank_profile_init") or {}).get("metrics") or {}).items()},
        "gaussian_reference": (o.eval or {}).get("gaussian_reference"),
        "distance_from_init": ((o.eval or {}).get("distance_from_init") or {}).get("model"),
        "run": o.name,
        "residual": o.cfg.model.residual,
        "n_layers": o.cfg.model.n_layers,
        "seed": o.cfg.train.seed,
        "status": o.status,
        "valid_loss": o.valid_loss,
        "final_train_loss": curve[-1][1] if curve and o.status == "finished" else math.nan,
        "erank_final_layer": geo["erank"][-1] if geo else math.nan,
        "erank_final_layer_init": init["erank"][-1] if init else math.nan,
        "erank_min": min(geo["erank"]) if geo else math.nan,
        "token_cosine_final_layer": geo["token_cosine"][-1] if geo else math.nan,
        "erank": geo.get("erank"),
        "beta_by_sublayer": {k: v["beta"] for k, v in (geo.get("sublayers") or {}).items() if "beta" in v},  # probe batch, after training
        "erank_init": init.get("erank"),
        "tokens": o.info.get("tokens"),
        "wall_seconds": o.info.get("wall_seconds"),
        "diverged": o.info.get("diverged"),
    }


def read_json(path: Path) -> dict | None:
    """The JSON document at `path`, None if there is no file; a file that does not parse is a
    ConfigError naming it (a truncated or hand-edited record), not a bare traceback."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); delete it to recompute that record, or restore it from the archive") from None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True))


def _json_default(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


Runner = Callable[[Experiment], dict]
