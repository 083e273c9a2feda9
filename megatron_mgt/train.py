"""The training loop: batches -> engine.train_step -> metrics -> checkpoints.

    mgt-train PRESET.yaml [section.key=value ...]

The loop does not know which engine runs the step. It owns the data position, the
schedule of evaluation and checkpoints, the stop conditions (max_steps, exit_at_step,
exit_after_minutes, SIGTERM/SIGUSR1/SIGINT, a non-finite loss) and the metrics. A run holds
an exclusive lock on its run directory (checkpoint.RunLock) for its whole life.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_mgt.checkpoint import (
    Checkpointer,
    RunLock,
    RunLockedError,
    find_checkpoint,
    remove_stale_temps,
    wait_for_pruning,
)
from megatron_mgt.config import Config, ConfigError, load_config, to_dict
from megatron_mgt.data.indexed import IndexedDataset
from megatron_mgt.data.loader import TokenBatchLoader, check_token_ids, eval_batches
from megatron_mgt.engine import build_engine
from megatron_mgt.engine.base import StepResult
from megatron_mgt.engine.dist import all_max, resolve_device, use_bf16
from megatron_mgt.engine.host_memory import tune_cpu_malloc
from megatron_mgt.fileio import write_text_atomic
from megatron_mgt.flops import device_peak_flops, flops_per_token, matmul_params
from megatron_mgt.metrics import MetricsLog, NullLog
from megatron_mgt.model import Transformer
from megatron_mgt.model.attention import kernel_description
from megatron_mgt.stability import StabilityMonitor
from megatron_mgt.telemetry import GeometryTelemetry

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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


def check_shards(cfg: Config) -> None:
    """Every token id of every configured shard must index the model's embedding, checked
    at start: a shard of another tokenizer fails here, not at its first evaluation."""
    for prefix in (cfg.data.train_prefix, cfg.data.valid_prefix, cfg.data.test_prefix):
        if prefix:
            tokens = IndexedDataset(prefix).tokens
            check_token_ids(torch.tensor([int(tokens.max()) if tokens.size else -1]), cfg.model.vocab_size, prefix)


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT; the loop checkpoints and exits at the next step
    boundary. A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT == self.signum:
            raise KeyboardInterrupt
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


def heldout_loss(batch_loss: Callable[[torch.Tensor, torch.Tensor], float], prefix: str, seq_len: int, batch_size: int, batches: int) -> dict:
    """The one held-out loss: sum_b loss_b * n_b / sum_b n_b over the first `batches`
    sequential windows batches of `batch_size` (data.loader.eval_batches), n_b the targets of
    batch b and loss_b = batch_loss(inputs, targets) their mean next-token loss (nats/token).
    The trainer, mgt-eval and the protocol runners all score held-out loss through it."""
    total, tokens, count = 0.0, 0, 0
    for x, y in eval_batches(prefix, seq_len, batch_size, batches):
        total += batch_loss(x, y) * y.numel()
        tokens += y.numel()
        count += 1
    loss = total / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "batches": count, "tokens": tokens}


def train(cfg: Config) -> TrainResult:
    t_start = time.monotonic()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_tokenizer(cfg)
    check_shards(cfg)
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        tune_cpu_malloc(cfg.train.cpu_malloc)
    engine = build_engine(cfg, device)
    lock = RunLock(Path(cfg.train.run_dir)) if engine.is_main else None
    try:
        lock_run(lock, engine)
        return Trainer(cfg, engine, t_start).run()
    finally:
        wait_for_pruning()  # old checkpoints still being deleted in the background: gone before the lock is let go
        if lock is not None:
            lock.release()
        engine.close()


def lock_run(lock: RunLock | None, engine) -> None:
    """Take the run lock (the main rank holds it); every rank raises when it is taken."""
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as err:
            error = err
    if engine.world_size > 1 and engine.any_rank(error is not None) and error is None:
        error = RunLockedError("the run directory is locked by another trainer (rank 0 names it)")
    if error is not None:
        raise error


class Trainer:
    """One run's loop over steps; the engine runs each step, the monitor judges it, the
    checkpointer saves and restores it. `run()` is the whole loop."""

    def __init__(self, cfg: Config, engine, t_start: float):
        tc = self.tc = cfg.train
        self.cfg, self.engine, self.t_start = cfg, engine, t_start
        self.run_dir = Path(tc.run_dir)
        self.loader = TokenBatchLoader(cfg.data.train_prefix, cfg.data.seq_len, tc.micro_batch_size, tc.seed, rank=engine.dp_rank, world_size=engine.dp_size)
        self.monitor = StabilityMonitor(cfg.stability) if cfg.stability.enabled else None
        self.gate = self.monitor.gate if self.monitor is not None and cfg.stability.response == "skip" else None
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", engine, self.loader, self.monitor, to_dict(cfg), keep=tc.keep_checkpoints)
        notes = {"removed_temps": remove_stale_temps(self.ckpt.root) if engine.is_main else [], "rejected_checkpoints": []}
        m, dtype = cfg.model, torch.bfloat16 if use_bf16(cfg, engine.device) else torch.float32
        notes["attention_kernel"] = kernel_description(m.d_model // m.n_heads, m.attention_kernel, engine.device, dtype, m.n_heads)  # in the first event
        resume_from = find_checkpoint(self.ckpt.root, tc.resume, warn=notes["rejected_checkpoints"].append)
        state = self.ckpt.restore(resume_from) if resume_from is not None else {}
        self.step, self.train_seconds = state.get("step", 0), state.get("train_seconds", 0.0)  # train_seconds: inside train steps, over every restart
        self.log = self.open_run(resume_from, state, notes) if engine.is_main else NullLog()
        self.telemetry = GeometryTelemetry(cfg, engine, self.log)
        self.tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * cfg.data.seq_len * engine.dp_size  # global
        self.step_flops = flops_per_token(cfg.model, model_matmul_params(cfg), cfg.data.seq_len) * self.tokens_per_step
        # per device. CPU, one rank: the best rate measured here at this thread count (flops.remembered_cpu_peak);
        # several ranks measure at once, each its share of the cores (their sum is the machine's peak)
        peak = device_peak_flops(engine.device, remember=engine.world_size == 1)
        self.peak = peak * engine.world_size if peak else None  # MFU per device = achieved / (per-device peak x devices)
        self.window_time, self.window_steps = 0.0, 0
        self.saved = str(resume_from) if resume_from is not None else None
        self.fresh = resume_from is None

    def open_run(self, resume_from: Path | None, state: dict, notes: dict) -> MetricsLog:
        """config.yaml (this run's config under one comment line per resume that changed it),
        the metrics log (torn line dropped, steps after the checkpoint superseded) and a
        first event with what start-up found: config changes, damaged checkpoints, stale temps."""
        changes, path = state.get("changes", []), self.run_dir / "config.yaml"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        history = [line for line in path.read_text().splitlines() if line.startswith("#")] if path.is_file() else []
        if changes:
            history.append(f"# step {self.step}, resumed from {resume_from}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes))
        for stale in sorted(self.run_dir.glob(f".{path.name}.*.tmp")):  # a killed write's temp (the run lock is ours: none is live)
            stale.unlink(missing_ok=True)
            notes["removed_temps"].append(stale.name)
        write_text_atomic(path, "".join(f"{line}\n" for line in history) + yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        log = MetricsLog(self.run_dir, self.cfg, str(self.engine.device), self.step if resume_from is not None else None)
        for message in notes["rejected_checkpoints"]:
            print(f"mgt-train: warning: {message}", file=sys.stderr)
        event = {"kind": "event", "step": self.step, "event": "started", **notes, **log.repairs}
        if resume_from is not None:
            changed = [{"key": k, "old": a, "new": b} for k, a, b in changes]
            event.update(event="resumed", checkpoint=str(resume_from), rank_state=state["rank_state"], config_changes=changed)
        log.log(event)
        return log

    def run(self) -> TrainResult:
        tc, status, last_loss, valid_loss = self.tc, "finished", float("nan"), None
        if self.step == 0:
            self.telemetry.at(0)  # geometry at init
        if self.fresh and self.monitor is not None and self.cfg.stability.response == "rollback":
            self.saved = str(self.ckpt.save(0, 0.0))  # something to roll back to before the first checkpoint
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (self.cfg.log.progress and self.engine.is_main), dynamic_ncols=True, desc=self.run_dir.name)
        try:
            with StopFlag() as stop:
                while self.step < tc.max_steps:
                    position = self.loader.consumed_samples
                    if self.monitor is not None and position in self.monitor.skip_positions:
                        self.loader.skip(tc.grad_accum_steps)  # the batch of an anomaly that was rolled back
                        self.log.log({"kind": "event", "step": self.step, "event": "skipped_batch", "position": position})
                        continue
                    out = self.train_step()
                    if not self.accepted(out, position):
                        bar.n = self.step  # rolled back
                        continue
                    self.step += 1
                    last_loss = out.loss
                    bar.update(1)
                    self.log_train(out, bar)
                    if self.cfg.data.valid_prefix and tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
                        valid_loss = self.valid_loss()
                        self.log.log({"kind": "valid", "step": self.step, "loss": valid_loss, "ppl": math.exp(min(valid_loss, 50.0))})
                    self.telemetry.at(self.step)
                    status = self.stop_status(stop)
                    if status != "finished" or self.step == tc.max_steps or (tc.save_every and self.step % tc.save_every == 0):
                        self.saved = str(self.ckpt.save(self.step, self.train_seconds))
                    if status != "finished":
                        self.log.log({"kind": "event", "step": self.step, "event": status, "checkpoint": self.saved})
                        break
        finally:
            bar.close()
            self.log.close()
        return TrainResult(status=status, step=self.step, last_loss=last_loss, valid_loss=valid_loss, checkpoint=self.saved, main=self.engine.is_main)

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        out = self.engine.train_step([self.loader.next_batch() for _ in range(self.tc.grad_accum_steps)], gate=self.gate)
        elapsed = time.perf_counter() - t0
        self.window_time += elapsed
        self.window_steps += 1
        self.train_seconds += elapsed
        return out

    def accepted(self, out: StepResult, position: int) -> bool:
        """Whether step `out` counts; False after a rollback. Raises TrainingDiverged when
        the run cannot go on (a kept non-finite step, too many skips and rollbacks)."""
        if self.monitor is None:
            if not (math.isfinite(out.loss) and math.isfinite(out.grad_norm)):
                raise self.diverged(out)
            return True
        verdict = self.monitor.respond(self.step + 1, out, position)
        for record in verdict.records:
            self.log.log(record)
        if verdict.action == "diverged":
            raise TrainingDiverged(verdict.message) if verdict.message else self.diverged(out)
        if verdict.action == "rollback":
            target = self.ckpt.latest()
            self.step = self.ckpt.restore(target)["step"]
            self.log.log({"kind": "event", "step": self.step, "event": "rollback", "checkpoint": str(target), "skip_position": position})
            return False
        return True

    def diverged(self, out: StepResult) -> TrainingDiverged:
        self.log.log({"kind": "event", "step": self.step + 1, "event": "non_finite", **vars(out)})
        applied = "was applied" if out.applied else "was not applied"
        return TrainingDiverged(
            f"step {self.step + 1}: loss={out.loss} grad_norm={out.grad_norm} is not finite; the step {applied}. Last good "
            f"checkpoint: {self.ckpt.latest() or 'none'} (resume from it with a lower train.lr or more warmup, or set stability.response=rollback)."
        )

    def log_train(self, out: StepResult, bar) -> None:
        if self.step % self.cfg.log.every and self.step != self.tc.max_steps:
            return
        tps = self.tokens_per_step * self.window_steps / self.window_time
        record = {"kind": "train", "step": self.step, "loss": out.loss, "grad_norm": out.grad_norm, "lr": self.engine.lr, "tokens_per_s": tps}
        record["train_seconds"] = self.train_seconds
        if out.update_norm is not None:
            record["update_norm"] = out.update_norm
        if self.peak:
            record["mfu"] = self.step_flops * self.window_steps / self.window_time / self.peak
        record["peak_mem_gib"] = all_max(peak_memory_gib(self.engine.device), self.engine.device)  # the fullest stage / rank
        self.log.log(record)
        bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{tps:.0f}", mfu=f"{record.get('mfu', float('nan')):.1%}")
        self.window_time, self.window_steps = 0.0, 0

    def valid_loss(self) -> float:
        """heldout_loss over `train.eval_batches` batches of the global micro-batch size
        (every rank gets the whole batch, the engine splits it over data-parallel ranks), so
        any engine at the same global batch evaluates the same windows."""
        size = self.tc.micro_batch_size * self.engine.dp_size
        return heldout_loss(self.engine.eval_loss, self.cfg.data.valid_prefix, self.cfg.data.seq_len, size, self.tc.eval_batches)["loss"]

    def stop_status(self, stop: StopFlag) -> str:
        status = "finished"
        if stop.signum is not None:
            status = f"signalled ({signal.Signals(stop.signum).name})"
        elif self.tc.exit_at_step and self.step >= self.tc.exit_at_step:
            status = "exited (train.exit_at_step)"
        elif self.tc.exit_after_minutes and time.monotonic() - self.t_start > 60 * self.tc.exit_after_minutes:
            status = "exited (train.exit_after_minutes)"
        if self.engine.world_size > 1 and self.engine.any_rank(status != "finished") and status == "finished":
            status = "signalled (on another rank)"  # all ranks stop at the same step
        return status


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    preset, overrides = (None, args) if "=" in args[0] else (args[0], args[1:])
    try:
        cfg = load_config(preset, overrides)
        result = train(cfg)
    except TrainingDiverged as err:
        print(f"mgt-train: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mgt-train: interrupted by a second SIGINT: stopped at once; the last complete checkpoint is intact", file=sys.stderr)
        return 128 + signal.SIGINT
    except (RunLockedError, OSError, ValueError) as err:  # ConfigError, CheckpointError, MetricsError are ValueErrors
        print(f"mgt-train: error: {err}", file=sys.stderr)
        return 2
    if not result.main:
        return 0
    if math.isnan(result.last_loss):  # no step ran: the checkpoint was already at max_steps
        print(f"mgt-train: {result.status} at step {result.step}: nothing left to train (train.max_steps={cfg.train.max_steps}), checkpoint {result.checkpoint}")
        return 0
    msg = f"mgt-train: {result.status} at step {result.step}, train loss {result.last_loss:.4f}"
    if result.valid_loss is not None:
        msg += f", valid loss {result.valid_loss:.4f} (ppl {math.exp(result.valid_loss):.2f})"
    print(msg + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
