"""How the Hydra entry points run: ``hydra_entry`` (``@hydra.main`` with the lab's error
policy), ``SweepReport`` (a multirun with failed jobs says so and exits 1) and
``launch_on_slurm`` (``hydra/launcher=slurm``: submitit's SLURM launcher that says where
its jobs are and follows them on clusters without accounting)."""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from submitit.slurm.slurm import SlurmInfoWatcher

from sclip_lab.config import CONF_DIR
from sclip_lab.errors import (
    EXIT_FAILED_JOBS,
    EXIT_USER_ERROR,
    UserError,
    check_config,
    message_of,
    report,
)
from sclip_lab.records import failed_jobs, mark_failed

log = logging.getLogger("sclip_lab")


class _Guarded:
    """The task function Hydra calls: config checks, then the task; user errors become one
    line. A plain class at module level, so that submitit pickles it by reference."""

    def __init__(self, task: Callable[[Any], Any]):
        self.task = task
        functools.update_wrapper(self, task)

    def __call__(self, cfg: Any) -> Any:
        try:
            check_config(cfg)
            return self.task(cfg)
        except UserError as e:
            report(e)
            if not _in_multirun():
                sys.exit(EXIT_USER_ERROR)
            _mark_job_failed(e)
        except Exception as e:
            if not _in_multirun():
                e.__sclip_task__ = True  # type: ignore[attr-defined]  # a bug: keep its traceback
                raise
            # One failed job must not stop a sweep: leave a trace and let the launcher go on.
            log.exception("job failed")
            _mark_job_failed(e)
        return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _mark_job_failed(error: BaseException) -> None:
    from hydra.core.hydra_config import HydraConfig

    mark_failed(Path(HydraConfig.get().runtime.output_dir), error)


# Scheduler jobs of this process's multirun that ended without returning (cancelled,
# killed, out of requeues): launch_on_slurm adds a line each, SweepReport lists them.
LOST_JOBS: list[str] = []


class SweepReport(Callback):
    """After a multirun: a summary of the jobs and variants that failed, and exit code 1.

    Jobs catch their own failures (so that one bad job does not stop a sweep) and leave a
    ``failed.json``; a job or variant that later succeeds removes it. This callback reads
    them from the sweep directory once every job has returned, whatever the launcher.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep_dir)
        lost, LOST_JOBS[:] = list(LOST_JOBS), []
        if not failed and not lost:
            return
        print(f"\n{len(failed) + len(lost)} job(s)/variant(s) of this sweep failed:",
              file=sys.stderr)
        for path, error in failed:
            print(f"  {path.parent}: {error[:200]}", file=sys.stderr)
        for line in lost:
            print(f"  {line}", file=sys.stderr)
        print("fix the cause and relaunch the same command: finished variants are skipped "
              "(a sweep outside conf/sweep/ needs "
              f"hydra.sweep.dir={sweep_dir} resume_root={sweep_dir})", file=sys.stderr,
              flush=True)
        sys.exit(EXIT_FAILED_JOBS)


def hydra_message(error: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line composition errors as one line."""
    parts = [message_of(error)]
    cause = error.__cause__
    if cause is not None and message_of(cause) not in parts[0]:
        parts.append(message_of(cause))
    if getattr(error, "override", None):  # OverrideParseException
        parts.insert(0, f"cannot parse the override {error.override}:")
    text = " ".join(parts).split("Config search path:")[0]
    text = re.sub(r"\s*(full_key|object_type|reference_type)[:=] ?\S*", "", text)
    options = re.search(r"Available options in '(\w+)':\s*(.*)$", text)
    if options:  # one comma-separated list, without the schema the group's files extend
        names = [n for n in options.group(2).split() if not n.startswith("base_")]
        text = (text[:options.start()].rstrip() + f"; available options in '{options.group(1)}': "
                + ", ".join(names))
    knob = re.search(r"Could not override 'attention\.(\w+)'", text)
    if knob and "not in struct" in text:  # a knob the chosen variant's file does not list
        return unknown_knob_message(knob.group(1))
    return text.strip()


def unknown_knob_message(key: str) -> str:
    """``attention.<key>=…`` on a variant without that knob: name the variant's knobs."""
    from sclip_lab.attention import ATTENTIONS

    chosen = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("attention=")]
    variant = ATTENTIONS.get(chosen[-1] if chosen else "csa")
    if variant is None:
        return f"attention has no knob {key!r}"
    return variant.unknown_knob(key)


def hydra_entry(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """``@hydra.main`` with the lab's error policy.

    Hydra's own errors (unknown group option or key, bad override syntax, an unusable run
    directory) and the task's user errors are one ``error:`` line with exit code 2; bugs
    keep their traceback.
    """
    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        hydra_main = hydra.main(config_path=str(CONF_DIR), config_name=config_name,
                                version_base="1.3")(_Guarded(task))

        @functools.wraps(task)
        def entry() -> Any:
            # Hydra then raises instead of printing its own multi-line report and exit 1.
            os.environ.setdefault("HYDRA_FULL_ERROR", "1")
            try:
                return hydra_main()
            except UserError as e:
                report(e)
                sys.exit(EXIT_USER_ERROR)
            except Exception as e:
                if getattr(e, "__sclip_task__", False):
                    raise
                if isinstance(e, OSError) and e.errno is not None:  # not Hydra's own
                    report(f"cannot create the run directory ({e.strerror}: {e.filename}); "
                           "set hydra.run.dir=<dir> (hydra.sweep.dir=<dir> with -m)")
                else:
                    report(f"{hydra_message(e)} (see --help for the config groups and keys)")
                sys.exit(EXIT_USER_ERROR)

        return entry

    return decorate


# ------------------------------------------------------------------------ SLURM launcher

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
