"""Long-horizon stability monitoring: loss, gradient-norm and update-norm spikes, non-finite values.

Every step the trainer gives the monitor the step's loss, its pre-clip gradient norm and the
norm of the update AdamW applied (engine.optim.adamw_update_sq_norm). A value x of kind k is a
spike when, after `stability.min_history` accepted steps,

    x > mu_k + max(z * sigma_k, rel_k * |mu_k|)

with mu_k, sigma_k the mean and standard deviation of k over the last `stability.window`
accepted values (a spike is not added, so it does not raise its own bar);
rel_k is `loss_rel`, `grad_norm_rel` or `update_norm_rel`. A non-finite loss or gradient norm
is an anomaly of kind `non_finite`.

Responses (`stability.response`) to the anomalies `stability.act_on` names (`loss`: loss
spikes and non-finite values, the default; `any`: gradient- and update-norm spikes too;
the rest are recorded):
    record    log it and go on (a non-finite value still stops the run: nothing can follow it);
    skip      withhold the optimizer step of a loss / gradient-norm / non-finite anomaly: the
              batch is dropped, weights, AdamW moments and lr schedule stay where they were,
              the step number advances. An update-norm spike is known only once the update is
              applied, so it is recorded;
    rollback  reload the last checkpoint (weights, optimizer, schedule, RNG, data position) and
              replay the same data order from there, leaving out the batch of the anomalous
              step when its turn comes (its data position is kept in `skip_positions`, which
              every later checkpoint carries).
After `max_actions` skips plus rollbacks the run stops (TrainingDiverged): something is
wrong beyond a bad batch.

Every anomaly is a metrics record {"kind": "anomaly", "step", "metric", "value", "mean",
"std", "threshold", "size" (value / mean), "response", "applied", "position"} (also in
RUN/anomalies.jsonl and on wandb); `mgt-compare` counts them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from megatron_mgt.config import StabilityConfig
from megatron_mgt.engine.base import StepResult

SPIKE_KINDS = ("loss", "grad_norm", "update_norm")
PRE_STEP_KINDS = ("loss", "grad_norm")  # known before the optimizer step: `skip` can withhold it


@dataclass(frozen=True)
class Anomaly:
    metric: str  # loss | grad_norm | update_norm | non_finite
    value: float
    mean: float
    std: float
    threshold: float

    def record(self, step: int, response: str, applied: bool, position: int) -> dict:
        size = self.value / self.mean if self.mean and math.isfinite(self.value) else None
        return {
            "kind": "anomaly",
            "step": step,
            "metric": self.metric,
            "value": self.value,
            "mean": self.mean,
            "std": self.std,
            "threshold": self.threshold,
            "size": size,
            "response": response,
            "applied": applied,
            "position": position,
        }


@dataclass
class Verdict:
    """What the trainer does after a step: `keep` it, `rollback` to the last checkpoint, or
    stop as `diverged` (with `message`); `records` are the anomaly records to log."""

    action: str  # keep | rollback | diverged
    records: list[dict] = field(default_factory=list)
    message: str = ""


class StabilityMonitor:
    """Running statistics per kind, the spike test, and the data positions to leave out."""

    def __init__(self, cfg: StabilityConfig):
        self.cfg = cfg
        self.history = {kind: deque(maxlen=cfg.window) for kind in SPIKE_KINDS}
        self.skip_positions: set[int] = set()
        self.actions = 0  # skips + rollbacks so far

    def _rel(self, kind: str) -> float:
        return getattr(self.cfg, f"{kind}_rel")

    def check(self, values: dict[str, float]) -> list[Anomaly]:
        """Anomalies among `values` (a subset of SPIKE_KINDS); nothing is recorded yet."""
        found = []
        for kind, value in values.items():
            if value is None:
                continue
            if not math.isfinite(value):
                if kind in PRE_STEP_KINDS:
                    found.append(Anomaly("non_finite", value, math.nan, math.nan, math.nan))
                continue
            window = self.history[kind]
            if len(window) < max(2, self.cfg.min_history):
                continue
            mean = math.fsum(window) / len(window)
            std = math.sqrt(max(0.0, math.fsum((v - mean) ** 2 for v in window) / len(window)))
            threshold = mean + max(self.cfg.z * std, self._rel(kind) * abs(mean))
            if value > threshold:
                found.append(Anomaly(kind, value, mean, std, threshold))
        return found

    def triggers(self, anomaly: Anomaly) -> bool:
        """Whether `anomaly` calls for the configured response (`stability.act_on`: loss
        spikes and non-finite values, or every kind); the others are recorded only."""
        return self.cfg.act_on == "any" or anomaly.metric in ("loss", "non_finite")

    def gate(self, loss: float, grad_norm: float) -> bool:
        """For `response=skip`: whether the engine may apply this step (no triggering anomaly)."""
        return not any(map(self.triggers, self.check({"loss": loss, "grad_norm": grad_norm})))

    def respond(self, step: int, result: StepResult, position: int) -> Verdict:
        """Check step `step`'s values, learn the normal ones, and decide the response.
        `position` is the step's data position (what a rollback leaves out)."""
        values = {"loss": result.loss, "grad_norm": result.grad_norm, "update_norm": result.update_norm}
        anomalies = self.check(values)
        flagged = {a.metric for a in anomalies}
        self.accept({k: v for k, v in values.items() if k not in flagged})
        acting = [a for a in anomalies if self.triggers(a)]
        response = self.cfg.response if acting else "record"
        acted = response == "rollback" or (response == "skip" and not result.applied)
        records = [a.record(step, response if acted and a in acting else "record", result.applied, position) for a in anomalies]
        if acted:
            self.actions += 1
            if self.actions > self.cfg.max_actions:
                return Verdict("diverged", records, f"step {step}: {self.actions} skips/rollbacks exceed stability.max_actions={self.cfg.max_actions}")
        if response == "rollback":
            self.skip_positions.add(position)
            return Verdict("rollback", records)
        finite = math.isfinite(result.loss) and math.isfinite(result.grad_norm)
        if not finite and (response == "record" or result.applied):
            return Verdict("diverged", records)  # nothing can follow a non-finite step that was kept
        return Verdict("keep", records)

    def accept(self, values: dict[str, float]) -> None:
        """Add values that were not anomalous to the running statistics."""
        for kind, value in values.items():
            if value is not None and math.isfinite(value):
                self.history[kind].append(value)

    def state_dict(self) -> dict:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "skip_positions": sorted(self.skip_positions),
            "actions": self.actions,
        }

    def load_state_dict(self, state: dict) -> None:
        for kind, values in state["history"].items():
            self.history[kind] = deque(values, maxlen=self.cfg.window)
        self.skip_positions = set(state["skip_positions"])
        self.actions = int(state["actions"])
