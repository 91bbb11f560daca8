"""Sweeps through a real SLURM scheduler (a single node on this machine, started by
``tests/slurm/start_local_slurm.sh``): submit, time limit and requeue, scancel and
resume, failed jobs, the job's identity in records and W&B. Plus quick checks of the
launcher's queue watcher and lost-job report that need no SLURM.

The ``slurm`` tests need Debian's ``slurm-wlm`` and ``munge`` and root (slurmd starts the
jobs); without them they skip with the reason (under ``CI=true`` they fail instead).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY
from slurm.cluster import LocalSlurm, SlurmUnavailable, process_state, task_processes, wandb_runs
from synthetic import write_benchmark

# variant entry -> its label in the console ("skip [label]")
LABELS = {"attention=sharpen temperature=8": "sharpen", "attention=local kernel=3": "local",
          "attention=csa": "csa"}
VARIANTS = tuple(LABELS)
GROUP = f"table3-{TINY}"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-node SLURM for this module's tests, stopped (jobs cancelled) afterwards."""
    try:
        cluster = LocalSlurm.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests: {e}")
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def sweep_setup(tiny_config_file, tiny_checkpoint, tmp_path_factory):
    """Benchmarks (voc21, context59, and a context59 with an undecodable image) and the
    tiny model's overrides, shared by the module."""
    root = tmp_path_factory.mktemp("slurm_data")
    good, bad = root / "data", root / "bad"
    for name in ("voc21", "context59"):
        write_benchmark(good, name, num_images=2, size=(64, 64))
    write_benchmark(bad, "voc21", num_images=2, size=(64, 64))
    write_benchmark(bad, "context59", num_images=2, size=(64, 64), corrupt_image_for=0)
    model = [f"model.arch={TINY}", f"model.config_file={tiny_config_file}",
             f"model.pretrained={tiny_checkpoint}", "num_workers=0", "num_threads=1"]
    return {"data": good, "bad": bad, "model": model, "root": root}


def sweep_args(setup: dict, sweeps: Path, datasets: tuple[str, ...], data: Path | None = None
               ) -> list[str]:
    """Table 3's sweep on ``datasets`` with three variants, on SLURM without GPUs."""
    return ["-m", "+sweep=table3", "hydra/launcher=slurm", *setup["model"],
            f"cache_dir={sweeps.parent / 'cache'}", f"data_root={data or setup['data']}",
            f"hydra.sweeper.params.dataset='{','.join(datasets)}'",
            "variants=[" + ",".join(f"'{v}'" for v in VARIANTS) + "]",
            "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]


class Launch:
    """``python -m sclip_lab.run <args>`` in the background, its output in files."""

    def __init__(self, slurm: LocalSlurm, sweeps: Path, args: list[str], name: str):
        self.out = sweeps.parent / f"{name}.out"
        self.err = sweeps.parent / f"{name}.err"
        env = {**slurm.env, "SCLIP_SWEEPS": str(sweeps), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "sclip_lab.run", *args],
                                         cwd=REPO, env=env, stdout=out, stderr=err)

    @property
    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def array_id(self, timeout_s: float = 90) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(r"to SLURM as (?:array )?job (\d+)", self.output)
            if found:
                return found.group(1)
            assert self.proc.poll() is None, self.output[-3000:]
            time.sleep(0.2)
        raise TimeoutError(f"no submission after {timeout_s} s:\n{self.output[-3000:]}")

    def wait(self, timeout_s: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the launcher did not return in {timeout_s} s:\n{self.output[-3000:]}")


def records(root: Path) -> dict[Path, dict]:
    return {p.relative_to(root): json.loads(p.read_text()) for p in root.rglob("result.json")}


def mtimes(root: Path) -> dict[Path, int]:
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("result.json")}


def make_tables(sweeps: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "analysis/make_tables.py", "--root", str(sweeps),
                           "--out", str(out), "--tables", "3"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} after {timeout_s} s")


def stop_task(job_id: str, slurm: LocalSlurm) -> list[int]:
    """``scancel --signal=STOP`` the task and wait until its python is stopped."""
    slurm.signal(job_id, "STOP")
    return wait_until(lambda: [p for p in task_processes(job_id) if process_state(p) == "T"],
                      10, f"task {job_id} not stopped")


def stop_between_records(job_id: str, slurm: LocalSlurm, job_dir: Path) -> None:
    """``stop_task`` at a moment when no record is half-written (none of the records'
    temporary files exists), so that the records seen then are all that the task finished
    before the stop; a stop that caught a write lets the task go on and stops it again."""
    for _ in range(100):
        stop_task(job_id, slurm)
        if not list(job_dir.rglob(".result-*")):
            return
        slurm.signal(job_id, "CONT")
        time.sleep(0.05)
    raise AssertionError(f"task {job_id} was always stopped in the middle of a record")


@pytest.fixture(scope="module")
def uninterrupted(slurm, sweep_setup):
    """The two-benchmark sweep run once through SLURM, and its table."""
    sweeps = sweep_setup["root"] / "uninterrupted" / "sweeps"
    sweeps.mkdir(parents=True)
    launch = Launch(slurm, sweeps, sweep_args(sweep_setup, sweeps, ("voc21", "context59")),
                    "launcher")
    array = launch.array_id()
    rc = launch.wait()
    tables = make_tables(sweeps, sweeps.parent / "tables") if rc == 0 else None
    return {"sweeps": sweeps, "rc": rc, "output": launch.output, "array": array,
            "tables": tables, "job_dir": sweeps / "table3" / TINY}


# ------------------------------------------------------------------------------- tests


@pytest.mark.slurm
@pytest.mark.e2e
def test_sweep_on_slurm_finishes_and_tables_build(uninterrupted):
    run = uninterrupted
    assert run["rc"] == 0, run["output"][-3000:]
    recs = records(run["sweeps"])
    assert len(recs) == 6
    assert {(r["summary"]["dataset"], r["variant"]) for r in recs.values()} == {
        (d, v) for d in ("voc21", "context59") for v in VARIANTS}
    # the launcher says where the jobs are and how to follow them, and is quiet about sacct
    out, array = run["output"], run["array"]
    assert f"submitted 2 job(s) to SLURM as array job {array} (tasks {array}_0 … " in out
    assert f"squeue -j {array}" in out and f"scancel {array}" in out
    assert f"{run['job_dir']}/.submitit/{array}_0/{array}_0_0_log.err" in out
    assert len([line for line in out.splitlines() if "sacct" in line]) == 1, out
    assert "Bypassing sacct error" not in out
    for task in ("0", "1"):
        assert (run["job_dir"] / ".submitit" / f"{array}_{task}" /
                f"{array}_{task}_0_log.err").is_file()
    import pandas as pd

    csv = pd.read_csv(run["tables"] / "table3.csv", index_col=0)
    for dataset in ("voc21", "context59"):
        assert csv[f"{dataset}_mean"].notna().sum() == 3  # sharpen τ=8, local 3, SCLIP
    assert csv["coco_stuff_mean"].isna().all()
    assert (run["tables"] / "table3.tex").is_file()


@pytest.mark.slurm
@pytest.mark.e2e
def test_records_and_wandb_carry_the_sweep_and_slurm_job(uninterrupted):
    run = uninterrupted
    assert run["rc"] == 0, run["output"][-3000:]
    recs = records(run["job_dir"])
    tasks = {"voc21": "0", "context59": "1"}  # the sweep's job order
    job_ids = set()
    for path, rec in recs.items():
        task = tasks[rec["summary"]["dataset"]]
        job = rec["job"]
        assert rec["sweep"] == {"table": "table3", "group": GROUP}
        assert job["slurm_array_job_id"] == run["array"] and job["slurm_array_task_id"] == task
        assert job["submitit_job_id"] == f"{run['array']}_{task}"
        assert job["slurm_cluster"] == "sclip-local" and job["slurm_partition"] == "debug"
        assert job["slurm_restart_count"] == 0 and job["host"]
        job_ids.add((task, job["slurm_job_id"]))
        # the W&B run of this record: the sweep's group, the same job in its config
        (wandb_run,) = wandb_runs(run["job_dir"] / path.parent)
        assert wandb_run["group"] == GROUP
        assert wandb_run["config"]["job"] == job
        assert wandb_run["config"]["sweep"] == rec["sweep"]
    assert len(job_ids) == 2 and len({j for _, j in job_ids}) == 2  # one SLURM job per task


@pytest.mark.slurm
@pytest.mark.e2e
def test_time_limit_requeues_and_the_restart_skips_finished_variants(slurm, sweep_setup,
                                                                     tmp_path):
    """SLURM signals USR2 ``signal_delay_s`` before a job's time limit; submitit then
    requeues the job (``max_num_timeout``). The signal is sent here, once the job has
    finished some of its variants, instead of waiting for the limit (timeout_min=5: any
    USR2 counts as a time-out for submitit below 10 minutes)."""
    sweeps = tmp_path / "sweeps"
    launch = Launch(slurm, sweeps, sweep_args(sweep_setup, sweeps, ("voc21",)), "launcher")
    job_id = launch.array_id()  # one job: not an array
    job_dir = sweeps / "table3" / TINY / "voc21"
    wait_until(lambda: list(job_dir.rglob("result.json")), 180, "no record")
    stop_between_records(job_id, slurm, job_dir)
    before = mtimes(job_dir)
    assert 1 <= len(before) < len(VARIANTS), f"the job finished {len(before)} variants"
    slurm.signal(job_id, "USR2")  # what SLURM sends at the time limit
    slurm.signal(job_id, "CONT")
    rc = launch.wait()
    assert rc == 0, launch.output[-3000:]
    # the scheduler requeued it once, and submitit did so for a time-out
    slurm.wait_for_state(job_id, {"COMPLETED"}, 60)  # the result comes before the job ends
    job = slurm.job(job_id)
    assert job["Restarts"] == "1" and job["JobState"] == "COMPLETED", job
    log = sweeps / "table3" / TINY / ".submitit" / job_id / f"{job_id}_0_log.err"
    text = log.read_text() + log.with_suffix(".out").read_text()
    assert "this job is timed-out" in text and f"Requeued job {job_id} (1 remaining" in text
    # the restart skipped what was finished and computed the rest
    recs = records(job_dir)
    assert len(recs) == len(VARIANTS)
    assert {p: t for p, t in mtimes(job_dir).items() if p in before} == before
    for path, rec in recs.items():
        assert rec["job"]["slurm_restart_count"] == (0 if path in before else 1)
        assert (f"skip [{LABELS[rec['variant']]}]" in text) == (path in before), path


@pytest.mark.slurm
@pytest.mark.e2e
def test_scancel_then_relaunch_recomputes_only_the_rest_and_tables_match(
        slurm, sweep_setup, uninterrupted, tmp_path):
    assert uninterrupted["rc"] == 0, uninterrupted["output"][-3000:]
    sweeps = tmp_path / "sweeps"
    args = sweep_args(sweep_setup, sweeps, ("voc21", "context59"))
    launch = Launch(slurm, sweeps, args, "first")
    array = launch.array_id()
    job_dir = sweeps / "table3" / TINY
    # cancel the context59 task as soon as it runs: nothing of it can be finished (its
    # python needs longer to start than KillWait gives it after the SIGTERM)
    slurm.wait_for_state(f"{array}_1", {"RUNNING"})
    assert not list((job_dir / "context59").rglob("result.json"))
    slurm.cancel(f"{array}_1")
    rc = launch.wait()
    out = launch.output
    # the launcher does not hang on the cancelled task: it lists it and exits 1
    assert rc == 1, out[-3000:]
    assert (f"SLURM job {array}_1 (#1 dataset=context59) ended without a result (CANCELLED)"
            in out), out[-3000:]
    assert "1 job(s)/variant(s) of this sweep failed" in out
    assert slurm.job(f"{array}_1")["JobState"] == "CANCELLED"
    finished = mtimes(job_dir)
    assert {p.parts[0] for p in finished} == {"voc21"} and len(finished) == 3
    # relaunching the same command computes only what the cancelled task had not finished
    again = Launch(slurm, sweeps, args, "again")
    rc = again.wait()
    assert rc == 0, again.output[-3000:]
    assert {p: t for p, t in mtimes(job_dir).items() if p in finished} == finished
    recs = records(job_dir)
    assert len(recs) == 6
    assert {p.parts[0] for p, r in recs.items()
            if r["job"]["slurm_array_job_id"] != array} == {"context59"}
    # the same table, byte for byte, as the uninterrupted sweep's
    tables = make_tables(sweeps, tmp_path / "tables")
    for name in ("table3.csv", "table3.tex"):
        assert (tables / name).read_bytes() == (uninterrupted["tables"] / name).read_bytes()


@pytest.mark.slurm
@pytest.mark.e2e
def test_a_failing_job_leaves_failed_json_and_the_sweep_exits_1(slurm, sweep_setup, tmp_path):
    sweeps = tmp_path / "sweeps"
    launch = Launch(slurm, sweeps, sweep_args(sweep_setup, sweeps, ("voc21", "context59"),
                                              data=sweep_setup["bad"]), "launcher")
    array = launch.array_id()
    rc = launch.wait()
    out = launch.output
    assert rc == 1, out[-3000:]
    job_dir = sweeps / "table3" / TINY
    failed = list(sweeps.rglob("failed.json"))
    assert [f.parent for f in failed] == [job_dir / "context59"]
    assert "1 job(s)/variant(s) of this sweep failed" in out
    assert f"{job_dir / 'context59'}:" in out
    assert {p.parts[0] for p in records(job_dir)} == {"voc21"} and len(records(job_dir)) == 3
    # both SLURM jobs returned: the failure is the job's own, reported, not a lost job
    assert "ended without a result" not in out
    for task in ("0", "1"):
        slurm.wait_for_state(f"{array}_{task}", {"COMPLETED"}, 60)


# ------------------------------------------------------- quick: no SLURM needed


def test_queue_watcher_falls_back_to_squeue_once(monkeypatch, caplog):
    """Without accounting sacct fails: one warning, then squeue; STOPPED is not done, a
    job that left the queue has ended."""
    from sclip_lab import slurm

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command[0])
        if command[0] == "sacct":
            return subprocess.CompletedProcess(command, 1, "", "Slurm accounting storage is "
                                               "disabled\n")
        return subprocess.CompletedProcess(
            command, 0, "7_0|RUNNING|node1|None\n7_1|STOPPED|node1|None\n"
                        "8_0|PENDING||PartitionTimeLimit\n", "")

    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    watcher = slurm.QueueWatcher()
    for job in ("7_0", "7_1", "7_2", "8_0"):
        watcher.register_job(job)
    for _ in range(3):
        watcher.update()
    assert calls == ["sacct", "squeue", "squeue", "squeue"]
    assert [r.message for r in caplog.records if "sacct" in r.message] == [
        "sacct cannot report job states here (Slurm accounting storage is disabled): "
        "following the jobs with squeue"]
    assert not watcher.is_done("7_0", mode="cache") and not watcher.is_done("7_1", mode="cache")
    assert watcher.is_done("7_2", mode="cache")  # not listed any more: ended
    assert watcher.reason("8_0") == "PartitionTimeLimit"


def test_sweep_report_lists_lost_jobs_and_exits_1(tmp_path, capsys):
    from omegaconf import OmegaConf

    from sclip_lab import cli

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    cli.SweepReport().on_multirun_end(config)  # nothing failed: silent
    cli.LOST_JOBS.append("SLURM job 7_1 (#1 dataset=voc21) ended without a result (CANCELLED)")
    with pytest.raises(SystemExit) as exit_:
        cli.SweepReport().on_multirun_end(config)
    assert exit_.value.code == 1 and not cli.LOST_JOBS
    err = capsys.readouterr().err
    assert "1 job(s)/variant(s) of this sweep failed" in err
    assert "7_1 (#1 dataset=voc21) ended without" in err
