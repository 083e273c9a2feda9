"""The training loop: batches -> engine.train_step -> metrics -> checkpoints.

    mgt-train PRESET.yaml [section.key=value ...]

The loop does not know which engine runs the step. It owns the data position, the
schedule of evaluation and checkpoints, the stop conditions (max_steps, exit_at_step,
exit_after_minutes, SIGTERM/SIGUSR1, a non-finite loss) and the metrics.

With several processes (torchrun / deepspeed / srun set RANK, WORLD_SIZE, ...) every rank
runs this loop: the loader reads its data-parallel slice, stop decisions are agreed by all
ranks, every rank writes its files into each checkpoint, and only the main rank (global
rank 0) logs, shows progress and writes metrics, provenance and the `latest` pointer.
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_mgt.checkpoint import find_checkpoint, load_trainer_state, rank_state_name, rng_state, save_checkpoint, set_rng_state
from megatron_mgt.config import Config, ConfigError, load_config, to_dict
from megatron_mgt.data.loader import TokenBatchLoader, eval_batches
from megatron_mgt.engine import build_engine
from megatron_mgt.engine.dist import all_max
from megatron_mgt.flops import device_peak_flops, flops_per_token, matmul_params
from megatron_mgt.metrics import MetricsLog, NullLog
from megatron_mgt.model import Transformer
from megatron_mgt.stability import StabilityMonitor
from megatron_mgt.telemetry import GeometryTelemetry

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the weights were not updated by that step."""


@dataclass
class TrainResult:
    status: str  # finished | exited | signalled
    step: int
    last_loss: float
    valid_loss: float | None
    checkpoint: str | None
    main: bool = True  # global rank 0 (the one that reports)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_tokenizer(cfg: Config) -> None:
    """The tokenizer's vocabulary must fit the model's embedding."""
    if not cfg.data.tokenizer:
        return
    import sentencepiece

    path = Path(cfg.data.tokenizer)
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: file not found: {path}")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer {path} has {vocab} pieces but model.vocab_size={cfg.model.vocab_size}")


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, else peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def model_matmul_params(cfg: Config) -> int:
    """Matmul weights of the whole model (whatever part this rank holds), from a meta model."""
    with torch.device("meta"):
        return matmul_params(Transformer(cfg.model))


def evaluate_loss(engine, cfg: Config) -> float:
    """Mean next-token loss over the first `train.eval_batches` held-out batches of the
    global micro-batch size (micro_batch_size x dp_size windows; every rank gets the whole
    batch, the engine splits it over data-parallel ranks), so any engine at the same
    global batch evaluates the same windows."""
    size = cfg.train.micro_batch_size * engine.dp_size
    losses = [engine.eval_loss(x, y) for x, y in eval_batches(cfg.data.valid_prefix, cfg.data.seq_len, size, cfg.train.eval_batches)]
    return sum(losses) / len(losses)


def train(cfg: Config) -> TrainResult:
    t_start = time.monotonic()
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    check_tokenizer(cfg)
    run_dir = Path(tc.run_dir)
    ckpt_root = run_dir / "checkpoints"

    engine = build_engine(cfg, resolve_device(tc.device))
    try:
        return _train_loop(cfg, engine, run_dir, ckpt_root, t_start)
    finally:
        engine.close()


def _train_loop(cfg: Config, engine, run_dir: Path, ckpt_root: Path, t_start: float) -> TrainResult:
    tc = cfg.train
    device = engine.device
    loader = TokenBatchLoader(
        cfg.data.train_prefix, cfg.data.seq_len, tc.micro_batch_size, tc.seed, rank=engine.dp_rank, world_size=engine.dp_size
    )
    monitor = StabilityMonitor(cfg.stability) if cfg.stability.enabled else None
    step = 0

    def restore(directory: Path) -> dict:
        """Engine, step, data position, RNG and monitor statistics from a checkpoint."""
        nonlocal step
        engine.load(directory)
        state = load_trainer_state(directory, engine.rank, engine.world_size)
        step = state["step"]
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        if monitor is not None and "stability" in state:
            skips, actions = set(monitor.skip_positions), monitor.actions
            monitor.load_state_dict(state["stability"])
            monitor.skip_positions |= skips  # a rollback keeps what it has learnt since
            monitor.actions = max(actions, monitor.actions)
        return state

    train_seconds = 0.0  # wall time inside train steps, over every restart of the run
    resume_from = find_checkpoint(ckpt_root, tc.resume)
    if resume_from is not None:
        state = restore(resume_from)
        train_seconds = state.get("train_seconds", 0.0)
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    log = MetricsLog(run_dir, cfg, str(device)) if engine.is_main else NullLog()
    if resume_from is not None:
        log.log({"kind": "event", "step": step, "event": "resumed", "checkpoint": str(resume_from), "rank_state": state["rank_state"]})
    telemetry = GeometryTelemetry(cfg, engine, log)
    if step == 0:
        telemetry.at(0)  # geometry at init
    tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * cfg.data.seq_len * engine.dp_size  # global
    step_flops = flops_per_token(cfg.model, model_matmul_params(cfg), cfg.data.seq_len) * tokens_per_step
    peak = device_peak_flops(device)  # per device; every rank measures at once (CPU: its share)
    if peak:
        peak *= engine.world_size  # MFU per device = achieved / (per-device peak x devices)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = loader.next_batch()
        top = int(max(inputs.max(), targets.max()))
        if top >= cfg.model.vocab_size:
            raise ValueError(
                f"{cfg.data.train_prefix}: token id {top} does not fit model.vocab_size={cfg.model.vocab_size} (was the shard made with another tokenizer?)"
            )
        return inputs, targets

    def checkpoint() -> str:
        state = {
            "step": step,
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "config": to_dict(cfg),
            "world_size": engine.world_size,
            "train_seconds": train_seconds,
        }
        if monitor is not None:
            state["stability"] = monitor.state_dict()

        def write_files(directory: Path) -> None:
            engine.save(directory)
            own = {
                "rank": engine.rank,
                "world_size": engine.world_size,
                "dp_rank": engine.dp_rank,
                "rng": rng_state(),
                "loader": loader.state_dict(),
            }
            torch.save(own, directory / rank_state_name(engine.rank))

        return str(
            save_checkpoint(ckpt_root, step, write_files, state, keep=tc.keep_checkpoints, is_main=engine.is_main, barrier=engine.barrier)
        )

    def diverged(out: dict) -> TrainingDiverged:
        log.log({"kind": "event", "step": step + 1, "event": "non_finite", **out})
        last_good = find_checkpoint(ckpt_root, "auto")
        applied = "was applied" if out.get("applied") else "was not applied"
        return TrainingDiverged(
            f"step {step + 1}: loss={out['loss']} grad_norm={out['grad_norm']} is not finite; the step {applied}. Last good "
            f"checkpoint: {last_good or 'none'} (resume from it with a lower train.lr or more warmup, or set stability.response=rollback)."
        )

    status, last_loss, valid_loss, saved = "finished", float("nan"), None, None
    if monitor is not None and cfg.stability.response == "rollback" and resume_from is None:
        saved = checkpoint()  # something to roll back to before the first checkpoint
    gate = None
    if monitor is not None and cfg.stability.response == "skip":
        gate = lambda loss, grad_norm: not any(map(monitor.triggers, monitor.check({"loss": loss, "grad_norm": grad_norm})))  # noqa: E731
    window_time, window_steps = 0.0, 0
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (cfg.log.progress and engine.is_main), dynamic_ncols=True, desc=run_dir.name)
    try:
        with StopFlag() as stop:
            while step < tc.max_steps:
                position = loader.consumed_samples
                if monitor is not None and position in monitor.skip_positions:
                    loader.skip(tc.grad_accum_steps)  # the batch of an anomaly that was rolled back
                    log.log({"kind": "event", "step": step, "event": "skipped_batch", "position": position})
                    continue
                t0 = time.perf_counter()
                batches = [next_batch() for _ in range(tc.grad_accum_steps)]
                out = engine.train_step(batches, gate=gate) if gate is not None else engine.train_step(batches)
                window_time += time.perf_counter() - t0
                window_steps += 1
                train_seconds += time.perf_counter() - t0
                finite = math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
                if monitor is None:
                    if not finite:
                        raise diverged(out)
                else:
                    values = {"loss": out["loss"], "grad_norm": out["grad_norm"], "update_norm": out.get("update_norm")}
                    anomalies = monitor.check(values)
                    flagged = {a.metric for a in anomalies}
                    monitor.accept({k: v for k, v in values.items() if k not in flagged})
                    acting = [a for a in anomalies if monitor.triggers(a)]
                    response = cfg.stability.response if acting else "record"
                    acted = response == "rollback" or (response == "skip" and not out["applied"])
                    for anomaly in anomalies:
                        log.log(anomaly.record(step + 1, response if acted and anomaly in acting else "record", out["applied"], position))
                    if acted:
                        monitor.actions += 1
                        if monitor.actions > cfg.stability.max_actions:
                            raise TrainingDiverged(
                                f"step {step + 1}: {monitor.actions} skips/rollbacks exceed stability.max_actions={cfg.stability.max_actions}"
                            )
                    if response == "rollback":
                        monitor.skip_positions.add(position)
                        target = find_checkpoint(ckpt_root, "auto")
                        restore(target)
                        bar.n = step
                        log.log({"kind": "event", "step": step, "event": "rollback", "checkpoint": str(target), "skip_position": position})
                        continue
                    if not finite and (response == "record" or out["applied"]):
                        raise diverged(out)  # nothing can follow a non-finite step that was kept
                step += 1
                last_loss = out["loss"]
                bar.update(1)
                if step % cfg.log.every == 0 or step == tc.max_steps:
                    tps = tokens_per_step * window_steps / window_time
                    record = {
                        "kind": "train",
                        "step": step,
                        "loss": last_loss,
                        "grad_norm": out["grad_norm"],
                        "lr": engine.lr,
                        "tokens_per_s": tps,
                        "train_seconds": train_seconds,
                    }
                    if out.get("update_norm") is not None:
                        record["update_norm"] = out["update_norm"]
                    if peak:
                        record["mfu"] = step_flops * window_steps / window_time / peak
                    record["peak_mem_gib"] = all_max(peak_memory_gib(device), device)  # the fullest stage / rank
                    log.log(record)
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:.0f}", mfu=f"{record.get('mfu', float('nan')):.1%}")
                    window_time, window_steps = 0.0, 0
                if cfg.data.valid_prefix and tc.eval_every and (step % tc.eval_every == 0 or step == tc.max_steps):
                    valid_loss = evaluate_loss(engine, cfg)
                    log.log({"kind": "valid", "step": step, "loss": valid_loss, "ppl": math.exp(min(valid_loss, 50.0))})
                telemetry.at(step)
                if stop.signum is not None:
                    status = f"signalled ({signal.Signals(stop.signum).name})"
                elif tc.exit_at_step and step >= tc.exit_at_step:
                    status = "exited (train.exit_at_step)"
                elif tc.exit_after_minutes and time.monotonic() - t_start > 60 * tc.exit_after_minutes:
                    status = "exited (train.exit_after_minutes)"
                if engine.world_size > 1 and engine.any_rank(status != "finished") and status == "finished":
                    status = "signalled (on another rank)"  # all ranks stop at the same step
                if status != "finished" or step == tc.max_steps or (tc.save_every and step % tc.save_every == 0):
                    saved = checkpoint()
                if status != "finished":
                    log.log({"kind": "event", "step": step, "event": status, "checkpoint": saved})
                    break
    finally:
        bar.close()
        log.close()
    return TrainResult(status=status, step=step, last_loss=last_loss, valid_loss=valid_loss, checkpoint=saved, main=engine.is_main)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    preset, overrides = (None, args) if "=" in args[0] else (args[0], args[1:])
    try:
        cfg = load_config(preset, overrides)
        result = train(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"mgt-train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"mgt-train: training diverged: {err}", file=sys.stderr)
        return 1
    if not result.main:
        return 0
    msg = f"mgt-train: {result.status} at step {result.step}, train loss {result.last_loss:.4f}"
    if result.valid_loss is not None:
        msg += f", valid loss {result.valid_loss:.4f} (ppl {math.exp(result.valid_loss):.2f})"
    print(msg + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
