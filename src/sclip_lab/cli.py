"""How the Hydra entry points run: ``hydra_entry`` (``@hydra.main`` with the lab's error
policy) and ``SweepReport`` (a multirun with failed jobs, or scheduler jobs that ended
without a result, says so and exits 1)."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback

from sclip_lab.config import CONF_DIR
from sclip_lab.errors import (
    EXIT_FAILED_JOBS,
    EXIT_USER_ERROR,
    Interrupted,
    PartialFailure,
    UserError,
    check_config,
    closest,
    message_of,
    report,
)
from sclip_lab.records import failed_jobs, mark_failed

log = logging.getLogger("sclip_lab")

# Top-level keys of conf/run.yaml and its siblings a user types (for "did you mean").
TOP_LEVEL_KEYS = ("n", "trial", "temperature", "kernel", "layer", "sigma", "data_root",
                  "limit", "auto_prepare", "device", "precision", "batch_size",
                  "images_per_batch", "num_workers", "num_threads", "seed", "cache_dir",
                  "trunk_cache", "trunk_cache_dtype", "save_overlays", "variants",
                  "resume_root", "image", "output", "logits", "classes", "logit_scale",
                  "points", "attentions", "size", "mode", "steps", "lr", "images")


class _Guarded:
    """The task function Hydra calls: config checks, then the task; user errors become one
    line. A plain class at module level, so that submitit pickles it by reference."""

    def __init__(self, task: Callable[[Any], Any]):
        self.task = task
        functools.update_wrapper(self, task)

    def __call__(self, cfg: Any) -> Any:
        log_files_fail_once()
        try:
            check_config(cfg)
            return self.task(cfg)
        except UserError as e:
            report(e)
            if not _in_multirun():
                sys.exit(e.exit_code)
            if not isinstance(e, PartialFailure):  # its variants have their failed.json
                _mark_job_failed(e)
        except Exception as e:
            if not _in_multirun():
                e.__sclip_task__ = True  # type: ignore[attr-defined]  # a bug: keep its traceback
                raise
            # One failed job must not stop a sweep: leave a trace and let the launcher go on.
            log.exception("job failed")
            _mark_job_failed(e)
        return None


def log_files_fail_once() -> None:
    """A log file that cannot be written (a full disk) is one warning, not logging's
    "--- Logging error ---" traceback at every line; the console log goes on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = functools.partial(_log_file_failed, handler)


def _log_file_failed(handler: logging.FileHandler, record: logging.LogRecord) -> None:
    if getattr(handler, "sclip_failed", False):
        return
    handler.sclip_failed = True  # type: ignore[attr-defined]
    error = sys.exc_info()[1]
    why = getattr(error, "strerror", None) or error
    print(f"warning: cannot write the log file {handler.baseFilename} ({why}); the console "
          "shows everything, records are written as usual", file=sys.stderr, flush=True)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _mark_job_failed(error: BaseException) -> None:
    from hydra.core.hydra_config import HydraConfig

    mark_failed(Path(HydraConfig.get().runtime.output_dir), error)


# Scheduler jobs of this process's multirun that ended without returning (cancelled,
# killed, out of requeues): slurm.launch_on_slurm adds a line each, SweepReport lists them.
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
    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if options and missing:  # an unknown option: the closest one, then the list
        names = [n for n in options.group(2).split() if not n.startswith("base_")]
        group, option = missing.groups()
        near = closest(option, names)
        hint = f"did you mean {group}={near}? " if near else ""
        return (f"unknown {group}={option} (no conf/{group}/{option}.yaml); {hint}"
                f"available options in '{group}': {', '.join(names)}")
    knob = re.search(r"Could not override 'attention\.(\w+)'", text)
    if knob and "not in struct" in text:  # a knob the chosen variant's file does not list
        return unknown_knob_message(knob.group(1))
    key = re.search(r"Could not override '([\w.]+)'", text)
    if key and "not in struct" in text:  # a misspelt group or top-level key
        return unknown_key_message(key.group(1), error)
    return text.strip()


def unknown_key_message(key: str, error: BaseException) -> str:
    """``atention=csa`` / ``kernal=3``: the closest config group or top-level key."""
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    known = [*groups, *TOP_LEVEL_KEYS]
    near = closest(key, known)
    value = str(getattr(error, "override", None) or "").split("=", 1)[-1]
    given = next((a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") == key), None)
    value = given.split("=", 1)[1] if given and "=" in given else value
    if not near:
        return f"{key} is not a config group or key"
    return f"{key} is not a config group or key; did you mean {near}" + (
        f"={value}?" if value else "?")


def unknown_knob_message(key: str) -> str:
    """``attention.<key>=…`` on a variant without that knob: name the variant's knobs."""
    from sclip_lab.attention import ATTENTIONS

    chosen = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("attention=")]
    variant = ATTENTIONS.get(chosen[-1] if chosen else "csa")
    if variant is None:
        return f"attention has no knob {key!r}"
    return variant.unknown_knob(key)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_as_one_line():
    """Ctrl-C (SIGINT) and SIGTERM end the command with one line and exit 130 / 143, not a
    traceback. Files in progress are temporary ones (``files.atomic_target``), removed on
    the way out, so nothing half-written is left; finished records stay."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as e:
        stop = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        print(stop.line(), file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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
            if "--verbose" in sys.argv[1:]:  # ours, not Hydra's: the libraries' full texts
                sys.argv.remove("--verbose")
                os.environ["SCLIP_VERBOSE"] = "1"
            try:
                with interrupts_as_one_line():
                    return hydra_main()
            except UserError as e:
                report(e)
                sys.exit(EXIT_USER_ERROR)
            except Exception as e:
                if getattr(e, "__sclip_task__", False):
                    raise
                if isinstance(e, OSError) and e.errno is not None:  # not Hydra's own
                    where = f": {e.filename}" if e.filename else ""
                    free = "free space or " if e.errno == errno.ENOSPC else ""
                    report(f"cannot create the run directory ({e.strerror}{where}); {free}"
                           "set hydra.run.dir=<dir> (hydra.sweep.dir=<dir> with -m)")
                else:
                    report(f"{hydra_message(e)} (see --help for the config groups and keys)")
                sys.exit(EXIT_USER_ERROR)

        return entry

    return decorate
