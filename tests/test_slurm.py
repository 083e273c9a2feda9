"""slurm/mgt_200l.sh on a real Slurm cluster (slurm-local, 2 emulated nodes).

The batch script runs unchanged; only the environment makes it CPU-sized (gloo, width 32,
a few steps, a synthetic corpus), while the depth stays 200 layers in a 2-stage DeepSpeed
pipeline with one rank on each node. Proves: the job exits 0, the loss is finite and falls,
a checkpoint holds both stages, a second job resumes from it, and SIGUSR1 before the time
limit leads to checkpoint -> `scontrol requeue` -> resume in the same job.

The cluster is started by ../shared/tools/slurm-local/start.sh (beside the repository, as
in CI) and always stopped afterwards, also when a test fails.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_zipf_shard

REPO = Path(__file__).resolve().parents[1]
# The harness beside the repository (../shared, as in CI), else $MGT_SLURM_LOCAL.
SLURM_LOCAL = next(
    (
        p
        for p in (Path(os.environ.get("MGT_SLURM_LOCAL", "/nonexistent")), REPO.parent / "shared" / "tools" / "slurm-local")
        if (p / "start.sh").is_file()
    ),
    REPO.parent / "shared" / "tools" / "slurm-local",
)
SCRIPT = "slurm/mgt_200l.sh"
JOB_TIMEOUT = 600  # s per sbatch --wait; a job that cannot be scheduled would wait forever

# The script's allocation (#SBATCH: 2 nodes x 8 tasks x 8 CPUs, 8 GPUs per node) must be
# satisfiable, so the emulated nodes advertise 64 CPUs and 8 fake GPUs each; the job then
# starts one rank per node (MGT_TASKS_PER_NODE=1).
CLUSTER_ENV = {"SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_CPUS": "64", "SLURM_LOCAL_GPUS": "8", "SLURM_LOCAL_MIN_JOB_AGE": "5"}

# Skipped where the tool is absent (a user's checkout); CI sets MGT_REQUIRE_SLURM=1, and there a
# missing tool is a failure, not a skip.
REQUIRED = os.environ.get("MGT_REQUIRE_SLURM") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REQUIRED and not (SLURM_LOCAL / "start.sh").is_file(), reason=f"slurm-local tool not found at {SLURM_LOCAL}"),
]


@pytest.fixture(scope="module")
def slurm_cluster(request):
    assert (SLURM_LOCAL / "start.sh").is_file(), f"MGT_REQUIRE_SLURM=1 but the slurm-local tool is not at {SLURM_LOCAL}"
    env = dict(os.environ, **CLUSTER_ENV)

    def stop():
        subprocess.run(["bash", str(SLURM_LOCAL / "stop.sh")], env=env, capture_output=True, text=True, timeout=120)

    request.addfinalizer(stop)  # registered first: runs even if start.sh fails half-way
    started = time.monotonic()
    out = subprocess.run(["bash", str(SLURM_LOCAL / "start.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "slurm ready" in out.stdout, f"slurm-local did not start:\n{out.stdout}\n{out.stderr}"
    print(f"slurm-local ready in {time.monotonic() - started:.1f} s")
    return out.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Synthetic shards in a directory the job's processes can read (same machine)."""
    root = tmp_path_factory.mktemp("slurm_corpus")
    write_zipf_shard(root / "train", n_docs=64, doc_len=300, vocab=256, seed=0)
    write_zipf_shard(root / "valid", n_docs=8, doc_len=300, vocab=256, seed=1)
    return str(root / "train"), str(root / "valid")


def job_env(corpus, work: Path, max_steps: int, **extra: str) -> dict[str, str]:
    """The environment that turns the 200-layer GPU job into a CPU-sized one."""
    train, valid = corpus
    overrides = {
        "parallel.engine": "deepspeed_pipe",
        "parallel.pipeline_stages": 2,  # 200 layers: stage 0 on node1, stage 1 on node2
        "model.d_model": 32,
        "model.n_heads": 2,
        "model.vocab_size": 256,
        "model.max_seq_len": 32,
        "data.seq_len": 32,
        "data.train_prefix": train,
        "data.valid_prefix": valid,
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 4,  # micro-batches through the pipeline per step
        "train.max_steps": max_steps,
        "train.warmup_steps": 1,
        "train.lr": 3e-3,
        "train.save_every": 3,
        "train.eval_every": 0,
        "log.every": 1,
        "log.geometry_every": 0,  # telemetry is not what this test is about
        "log.wandb": "disabled",
        "log.progress": False,
    }
    (work / "logs").mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        MGT_PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
        MGT_BACKEND="gloo",
        DS_ACCELERATOR="cpu",
        WANDB_MODE="disabled",
        MGT_TASKS_PER_NODE="1",
        MGT_CPUS_PER_TASK="1",
        MGT_RUN_DIR=str(work / "run"),
        MGT_OVERRIDES=" ".join(f"{k}={v}" for k, v in overrides.items()),
        SBATCH_OUTPUT=str(work / "logs" / "%x-%j.out"),
        SBATCH_TIMELIMIT="15",
        **extra,
    )


def job_log(work: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted((work / "logs").glob("*.out")))


def sbatch_wait(env: dict[str, str], work: Path, script: str = SCRIPT) -> tuple[int, float]:
    started = time.monotonic()
    out = subprocess.run(
        ["timeout", str(JOB_TIMEOUT), "sbatch", "--wait", "--parsable", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    elapsed = time.monotonic() - started
    print(f"sbatch --wait: exit {out.returncode} after {elapsed:.1f} s")
    assert out.returncode == 0, f"job failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}\n{job_log(work)}"
    return int(out.stdout.split(";")[0].split()[-1]), elapsed


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def assert_checkpoint_has_both_stages(step_dir: Path) -> None:
    assert (step_dir / "trainer.pt").is_file(), f"no trainer state in {step_dir}"
    # DeepSpeed pipeline layout: one model-state file per pipeline stage, one file per layer.
    assert (step_dir / "mp_rank_00_model_states.pt").is_file() and (step_dir / "mp_rank_01_model_states.pt").is_file()
    assert (step_dir / "layer_00-model_states.pt").is_file()  # embedding (stage 0)
    assert (step_dir / "layer_200-model_states.pt").is_file()  # block 199 (stage 1)


def test_200_layers_two_node_pipeline_trains_checkpoints_and_resumes(slurm_cluster, corpus, tmp_path):
    run = tmp_path / "run"
    job1, t1 = sbatch_wait(job_env(corpus, tmp_path, max_steps=6), tmp_path)

    log = job_log(tmp_path)
    assert "2 node(s) x 1 task(s)" in log
    assert "rank 0 of 2 (local 0) on node1" in log and "rank 1 of 2 (local 0) on node2" in log, log
    config = (run / "config.yaml").read_text()
    assert "n_layers: 200" in config and "pipeline_stages: 2" in config and "engine: deepspeed_pipe" in config

    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, 7))
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.1 and sum(losses[3:]) < sum(losses[:3]), losses
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000006"
    assert_checkpoint_has_both_stages(run / "checkpoints" / latest)

    # A second job on the same run dir resumes (train.resume=auto) and carries on.
    job2, t2 = sbatch_wait(job_env(corpus, tmp_path, max_steps=9), tmp_path)
    assert job2 != job1
    events = records(run, "event")
    assert any(e["event"] == "resumed" and e["step"] == 6 and e["checkpoint"].endswith("step_00000006") for e in events), events
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, 10))
    assert all(math.isfinite(r["loss"]) for r in train)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000009"
    print(f"job {job1}: 6 steps in {t1:.1f} s; job {job2}: resumed, 3 more steps in {t2:.1f} s")


def job_state(job: int) -> dict[str, str]:
    """JobState, Restarts, ExitCode ... of a job from `scontrol show job -o` ({} once it is gone)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_usr1_before_time_limit_checkpoints_requeues_and_resumes(slurm_cluster, corpus, tmp_path):
    run = tmp_path / "run"
    env = job_env(corpus, tmp_path, max_steps=12)
    started = time.monotonic()
    # Not `sbatch --wait`: it may return (exit 1) at the moment of the requeue, when it
    # happens to poll the job in its transient REQUEUED state. Poll the job state instead.
    out = subprocess.run(["sbatch", "--parsable", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = int(out.stdout.split(";")[0])
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ((run / "metrics.jsonl").is_file() and len(records(run, "train")) >= 2):
        assert job_state(job).get("JobState") in ("PENDING", "RUNNING"), f"job ended before it was signalled:\n{job_log(tmp_path)}"
        assert time.monotonic() < deadline, f"no training steps within {JOB_TIMEOUT} s:\n{job_log(tmp_path)}"
        time.sleep(0.5)
    # What Slurm does 120 s before the limit (--signal=B:USR1@120): signal the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    released, requeued_at, ended_at = False, None, None
    while True:
        state = job_state(job)
        assert state, f"job {job} vanished before it was seen to finish:\n{job_log(tmp_path)}"
        if state["JobState"] == "PENDING" and state.get("Restarts") == "1" and not released:
            # Slurm holds a requeued job for ~2 min (Reason=BeginTime): release it, but not in
            # the second of the requeue: slurmd revokes the first run's credential with a
            # 1-second timestamp, and a restart launched within it is killed ("Job credential
            # revoked", exit 1; seen in CI).
            requeued_at = requeued_at or time.monotonic()
            if time.monotonic() - requeued_at >= 2.5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
                released = True
        # Right at `scontrol requeue`, Slurm may show Restarts=1 with the first run's end
        # (JobState=FAILED, RunTime 0) before the job turns PENDING: a terminal state counts
        # only once the requeued run has started (its batch script logged "restart 1").
        if state.get("Restarts") == "1" and state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            ended_at = ended_at or time.monotonic()
            restarted = any(f"job {job} restart 1 " in p.read_text() for p in (tmp_path / "logs").glob("*.out"))
            if restarted or (released and time.monotonic() - ended_at > 20):  # a restart that died before its script ran: fail now
                break
        else:
            ended_at = None
        assert state.get("Restarts") in ("0", "1"), state
        assert time.monotonic() < deadline, f"job {job} did not finish after the requeue:\n{state}\n{job_log(tmp_path)}"
        time.sleep(0.5)
    print(f"signal -> requeue -> finish: {time.monotonic() - started:.1f} s")
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{job_log(tmp_path)}"

    log = job_log(tmp_path)
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log, log
    events = [e for e in records(run, "event") if e["event"] != "started"]  # "started": the fresh run's start-up notes
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["signalled (SIGUSR1)", "resumed"], events
    stopped = events[0]["step"]
    assert events[1]["step"] == stopped and events[1]["checkpoint"] == events[0]["checkpoint"]
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, 13))  # no step lost, none repeated
    assert all(math.isfinite(r["loss"]) for r in train)
    assert (run / "jobs" / f"{job}.0").is_dir() and (run / "jobs" / f"{job}.1").is_dir()  # one record per restart


def test_debug_job_runs_both_ranks_on_one_node(slurm_cluster, corpus, tmp_path):
    """slurm/debug.sh: 1 node, 2 tasks, its own preset (200 layers, 2 stages) via mgt_200l.sh."""
    env = job_env(corpus, tmp_path, max_steps=3)
    del env["MGT_TASKS_PER_NODE"]  # the debug allocation itself: 2 tasks on 1 node
    del env["MGT_RUN_DIR"]
    env["MGT_RUN_DIR"] = str(tmp_path / "debug_run")
    _, elapsed = sbatch_wait(env, tmp_path, "slurm/debug.sh")
    log = job_log(tmp_path)
    assert "1 node(s) x 2 task(s)" in log and "preset configs/mgt_200l_debug.yaml" in log, log
    assert "rank 0 of 2 (local 0) on node1" in log and "rank 1 of 2 (local 1) on node1" in log, log
    train = records(tmp_path / "debug_run", "train")
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)
    print(f"debug job: {elapsed:.1f} s")


def test_a_failing_job_reports_its_exit_code_and_is_not_requeued(slurm_cluster, corpus, tmp_path):
    env = job_env(corpus, tmp_path, max_steps=3)
    env["MGT_OVERRIDES"] += " model.n_layer=12"  # a typo: the trainer exits 2 on every rank
    out = subprocess.run(
        ["timeout", str(JOB_TIMEOUT), "sbatch", "--wait", "--parsable", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True
    )
    log = job_log(tmp_path)
    assert out.returncode != 0, log
    assert "unknown config key 'model.n_layer' (did you mean 'n_layers'?)" in log
    assert "ranks exited with status" in log and "requeueing" not in log


def test_wt103_job_array_runs_each_task_into_its_own_run_directory(slurm_cluster, corpus, tmp_path):
    """slurm/wt103_stability.sh unchanged: an array file of 2 variants x 1 depth at CPU size
    (configs/wt103/cpu.yaml with the synthetic corpus), one task per run on its own node,
    per-run directories and wandb groups; a resubmitted task resumes its run."""
    train, valid = corpus
    runs_root = tmp_path / "runs"
    array = tmp_path / "array.yaml"
    array.write_text(
        f"name: wt_test\nruns_root: {runs_root}\npresets: {{3: {REPO / 'configs/wt103/cpu.yaml'}}}\nvariants: [mgt, preln]\nseeds: [1]\n"
    )
    tiny = {
        "data.train_prefix": train,
        "data.valid_prefix": valid,
        "data.test_prefix": valid,
        "data.tokenizer": "",
        "model.vocab_size": 256,
        "model.max_seq_len": 32,
        "data.seq_len": 32,
        "train.warmup_steps": 1,
        "train.save_every": 2,
        "train.eval_every": 2,
        "log.geometry_every": 2,
        "log.every": 1,
        "log.wandb": "disabled",
        "log.progress": False,
    }
    (tmp_path / "logs").mkdir()

    def env(max_steps: int) -> dict[str, str]:
        overrides = " ".join(f"{k}={v}" for k, v in {**tiny, "train.max_steps": max_steps}.items())
        return dict(os.environ, MGT_PYTHON=sys.executable, PYTHONPATH=str(REPO), MGT_ARRAY=str(array), MGT_BACKEND="gloo", WANDB_MODE="disabled",
                    MGT_TASKS_PER_NODE="1", MGT_CPUS_PER_TASK="1", MGT_OVERRIDES=overrides, SBATCH_OUTPUT=str(tmp_path / "logs" / "%x-%A_%a.out"), SBATCH_TIMELIMIT="15")  # fmt: skip

    started = time.monotonic()
    out = subprocess.run(["timeout", str(JOB_TIMEOUT), "sbatch", "--wait", "--parsable", "--array=0-1", "slurm/wt103_stability.sh"], cwd=REPO, env=env(4), capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{job_log(tmp_path)}"
    log = job_log(tmp_path)
    assert "array task 0 of" in log and "-> mgt_L3_s1" in log and "array task 1 of" in log and "-> preln_L3_s1" in log, log
    for variant in ("mgt", "preln"):
        run = runs_root / "wt_test" / f"{variant}_L3_s1"
        config = (run / "config.yaml").read_text()
        assert (
            f"residual: {variant}" in config
            and "n_layers: 3" in config
            and "wandb_group: wt_test" in config
            and "run_name: " + f"{variant}_L3_s1" in config
        )
        assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records(run, "train"))
        assert [r["step"] for r in records(run, "geometry")] == [0, 2, 4]
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    # resubmit task 1 with a longer horizon: it continues its own run
    out = subprocess.run(["timeout", str(JOB_TIMEOUT), "sbatch", "--wait", "--parsable", "--array=1", "slurm/wt103_stability.sh"], cwd=REPO, env=env(6), capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{job_log(tmp_path)}"
    run = runs_root / "wt_test" / "preln_L3_s1"
    assert any(e["event"] == "resumed" and e["step"] == 4 for e in records(run, "event"))
    assert [r["step"] for r in records(run, "train")] == list(range(1, 7))
    assert [r["step"] for r in records(runs_root / "wt_test" / "mgt_L3_s1", "train")] == [1, 2, 3, 4]  # untouched
    print(f"wt103 array: 2 tasks + 1 resubmission in {time.monotonic() - started:.1f} s")


def test_experiment_runner_array_splits_the_grid(slurm_cluster, corpus, tmp_path):
    """slurm/experiment.sh: two array tasks run the same depth_scaling experiment on one run
    pool; each trains one of the two runs (non-blocking pool locks) and both report all."""
    import yaml

    train, valid = corpus
    base = {
        "model": {"vocab_size": 256, "d_model": 32, "n_heads": 2, "max_seq_len": 32},
        "data": {"seq_len": 32, "train_prefix": train, "valid_prefix": valid},
        "train": {
            "seed": 1,
            "micro_batch_size": 4,
            "max_steps": 200,  # a run lasts ~10 s, far longer than the start-up skew between the tasks
            "warmup_steps": 2,
            "eval_every": 0,
            "eval_batches": 2,
            "save_every": 100,
            "threads": 1,
            "device": "cpu",
        },
        "log": {"every": 50, "wandb": "disabled", "progress": False},
        "eval": {"batches": 2, "geometry_batch": 2},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    preset = tmp_path / "depth.yaml"
    grid = {"variants": ["preln", "mgt"], "depths": [2], "seeds": [1], "tuning": {"center": 3.0e-3, "points": 4, "factor": 2, "max_points": 4}}
    preset.write_text(
        yaml.safe_dump(
            {"experiment": "depth_scaling", "base": "base.yaml", "out": str(tmp_path / "out"), "pool": str(tmp_path / "pool"), "grid": grid}
        )
    )
    (tmp_path / "logs").mkdir()
    env = dict(os.environ, MGT_PYTHON=sys.executable, PYTHONPATH=str(REPO), WANDB_MODE="disabled", SBATCH_OUTPUT=str(tmp_path / "logs" / "%x-%A_%a.out"), SBATCH_TIMELIMIT="15")  # fmt: skip
    cmd = [
        "timeout",
        str(JOB_TIMEOUT),
        "sbatch",
        "--wait",
        "--parsable",
        "--array=0-1",
        "slurm/experiment.sh",
        "depth_scaling",
        str(preset),
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{job_log(tmp_path)}"
    runs = sorted(p for p in (tmp_path / "pool").iterdir() if p.is_dir())
    assert len(runs) == 8  # 2 arms x 4 lr-sweep points; the comparison runs at seed 1 are sweep runs
    tasks = set()
    for run in runs:
        assert [r["step"] for r in records(run, "train")] == [50, 100, 150, 200]  # trained once, by one task
        assert (run / "eval" / "eval.json").is_file()
        tasks.add(json.loads((run / "provenance.json").read_text())["slurm"]["array_task"])
    assert tasks == {"0", "1"}, "the two tasks split the sweep grid"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["centered"] is True and len(results["runs"]) == 2
    assert job_log(tmp_path).count("runner exited with status 0") == 2
