"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher that says where its
jobs are and follows them, also on clusters without accounting (``launch_on_slurm``,
called by ``hydra_plugins.sclip_lab_launcher.SlurmLauncher``; README "Running on SLURM").
Jobs that end without a result are added to ``cli.LOST_JOBS`` for ``cli.SweepReport``."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from submitit.slurm.slurm import SlurmInfoWatcher

from sclip_lab.cli import LOST_JOBS

log = logging.getLogger("sclip_lab")

QUEUE_POLL_S = 30  # longest wait between two looks at the queue (sooner after submitting)
# States of a job that may still return (submitit's list misses STOPPED, SUSPENDED, ...).
UNFINISHED_STATES = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING",
                     "PREEMPTED", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                     "STAGE_OUT", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
# Pending reasons that the scheduler will not resolve by itself.
NEVER_STARTS = {"PartitionTimeLimit", "PartitionNodeLimit", "PartitionConfig",
                "PartitionDown", "PartitionInactive", "InvalidAccount", "InvalidQOS",
                "BadConstraints", "QOSMaxWallDurationPerJobLimit",
                "AssocMaxWallDurationPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxCpuPerJobLimit"}


class QueueWatcher(SlurmInfoWatcher):
    """Job states from ``sacct``, else from ``squeue``.

    Without accounting (no slurmdbd, as on small clusters) sacct fails on every call:
    submitit then warns at every poll and, never learning that a job was cancelled or
    killed, waits for its result forever. This watcher says so once and asks ``squeue``
    instead (every state, reasons included, for as long as the controller keeps finished
    jobs: MinJobAge); a job that has left the queue without a result has ended.
    """

    def __init__(self, delay_s: int = QUEUE_POLL_S):
        super().__init__(delay_s=delay_s)
        self.use_sacct = True

    def _make_command(self) -> list[str] | None:
        ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
        if not ids:
            return None
        if self.use_sacct:
            return ["sacct", "-o", "JobID,State,NodeList,Reason", "--parsable2",
                    *(f"--jobs={i}" for i in ids)]
        return ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N|%r",
                f"--jobs={','.join(ids)}"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        if not self.use_sacct:  # squeue: the same columns without the header line
            text = "JobID|State|NodeList|Reason\n" + text
        return super().read_info(text)

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
            ok, error = proc.returncode == 0, (proc.stderr or proc.stdout).strip()
        except (OSError, subprocess.SubprocessError) as e:
            proc, ok, error = None, False, str(e)
        if not ok and self.use_sacct:
            self.use_sacct = False
            log.warning("sacct cannot report job states here (%s): following the jobs with "
                        "squeue", error.splitlines()[0] if error else "no accounting")
            return self.update()
        self._last_status_check = time.time()
        if ok:
            info = self.read_info(proc.stdout)
            self._info_dict.update(info)
            if not self.use_sacct:  # asked for and not listed: gone from the controller
                asked = set(command[-1].split("=", 1)[1].split(","))
                for job_id in self._registered - self._finished - set(info):
                    if job_id.split("_")[0] in asked:
                        self._info_dict[job_id] = {"State": "ENDED"}
        elif "Invalid job id" in error:  # squeue: none of them is known any more
            for job_id in self._registered - self._finished:
                self._info_dict[job_id] = {"State": "ENDED"}
        else:
            log.debug("squeue failed (%s); asking again later", error)
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        state = self.get_state(job_id, mode=mode).upper().split()
        return bool(state) and state[0] not in UNFINISHED_STATES

    def reason(self, job_id: str) -> str:
        return self._info_dict.get(job_id, {}).get("Reason", "")


def launch_on_slurm(launcher: Any, job_overrides: Sequence[Sequence[str]],
                    initial_job_idx: int) -> list:
    """``hydra/launcher=slurm`` (``hydra_plugins.sclip_lab_launcher.SlurmLauncher``, a
    hydra-submitit-launcher SlurmLauncher): submit the jobs as one SLURM array, say where
    they are, and wait for every one of them.

    - prints the array job id, where each job's logs go and how to follow them;
    - follows the jobs with ``squeue`` where ``sacct`` cannot answer (``QueueWatcher``: one
      line instead of a warning at every poll), and warns once about jobs pending for a
      reason that will not go away (a time limit above the partition's, ...);
    - a job that ends without a result (``scancel``, killed, out of requeues) is listed by
      ``SweepReport`` with its log and the sweep exits 1, instead of the launcher stopping
      with a traceback at the first such job while the others still run.

    Jobs go on if this process stops. Each runs ``launcher.__call__`` (submitit pickles the
    launcher); SLURM signals USR2 ``signal_delay_s`` before the time limit and submitit
    requeues the job (``max_num_timeout`` times) through the launcher's ``checkpoint``.
    """
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    config = launcher.config
    assert config is not None
    params = dict(launcher.params)
    init: dict[str, Any] = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v
                                  for k, v in params.items()})
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    args = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                     Singleton.get_state()))
    jobs = executor.map_array(launcher, *zip(*args))
    watcher = QueueWatcher()
    for job in jobs:  # this sweep's jobs only: submitit's shared watcher asks sacct
        job.watcher = watcher
        watcher.register_job(job.job_id)
    arrays = sorted({job.job_id.split("_")[0] for job in jobs}, key=int)
    ids = (f"array job {', '.join(arrays)} (tasks {jobs[0].job_id} … {jobs[-1].job_id})"
           if "_" in jobs[0].job_id else f"job {jobs[0].job_id}")
    log.info("submitted %d job(s) to SLURM as %s%s", len(jobs), ids,
             f" on partition {params['partition']}" if params.get("partition") else "")
    log.info("logs: %s/<job>/<job>_0_log.err (and .out), e.g. %s",
             jobs[0].paths.folder.parent, jobs[0].paths.stderr)
    log.info("follow: squeue -j %s; tail -f %s. The jobs go on without this process "
             "(relaunching the same command resumes; scancel %s stops them)",
             ",".join(arrays), jobs[0].paths.stderr, " ".join(arrays))
    try:
        return _wait(jobs, job_overrides, watcher, initial_job_idx)
    except KeyboardInterrupt:
        log.warning("stopped waiting; the jobs go on: squeue -j %s (scancel %s stops them); "
                    "relaunch the same command to collect and resume", ",".join(arrays),
                    " ".join(arrays))
        raise SystemExit(130) from None


def _wait(jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]], watcher: QueueWatcher,
          first_idx: int = 0) -> list:
    """Every job's JobReturn, in order, as they end; a job that ends without one is lost
    (``LOST_JOBS``) and gets an empty return, so that the sweep reports instead of raising."""
    from hydra.core.utils import JobReturn, JobStatus

    common = set.intersection(*(set(o) for o in job_overrides)) if len(jobs) > 1 else set()
    labels = [" ".join([f"#{first_idx + i}"] + [o for o in overrides if o not in common])
              for i, overrides in enumerate(job_overrides)]  # what tells the jobs apart

    returns: list[Any] = [None] * len(jobs)
    waiting, warned = set(range(len(jobs))), set()
    while waiting:
        for i in sorted(waiting):
            job = jobs[i]
            if not job.done():
                reason = watcher.reason(job.job_id)
                if reason in NEVER_STARTS and reason not in warned:
                    warned.add(reason)
                    log.warning("SLURM job %s is pending (%s) and will not start as "
                                "submitted: check the partition's limits (sinfo, scontrol "
                                "show partition) and hydra.launcher.*", job.job_id, reason)
                continue
            waiting.discard(i)
            try:
                returns[i] = job.results()[0]
                log.info("SLURM job %s (%s) finished", job.job_id, labels[i])
            except Exception:  # noqa: BLE001 - cancelled, killed, out of requeues
                state = watcher.get_state(job.job_id, mode="cache")
                line = (f"SLURM job {job.job_id} ({labels[i]}) ended without a result "
                        f"({state}); its log: {job.paths.stderr}")
                log.error(line)
                LOST_JOBS.append(line)
                returns[i] = JobReturn(overrides=list(job_overrides[i]),
                                       status=JobStatus.COMPLETED)
                returns[i].return_value = None
        if waiting:
            time.sleep(1)
    return returns
