"""How every entry point fails: one ``error: ...`` line naming the fix, exit code 2.

A ``UserError`` is a problem with what the user gave (a config value, data on disk, a
weights file, a path); its message is one line that says what to change. Anything else is
a bug in the lab and keeps its traceback (exit code 1). Entry points are wrapped by
``hydra_entry`` (Hydra CLIs) or call ``report`` themselves (argparse CLIs).

Exit codes: 0 done, 1 a bug or a sweep with failed jobs, 2 a user error, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("sclip_lab")

EXIT_USER_ERROR = 2
EXIT_FAILED_JOBS = 1
FAILED_FILE = "failed.json"


class UserError(Exception):
    """A problem with the user's input; the message is one line that names the fix."""


class ConfigError(UserError, ValueError):
    """An impossible or unknown config value."""


def message_of(error: BaseException) -> str:
    """The error's own one-line message (a DataLoader worker's wrapper removed)."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        # torch re-raises a worker's exception with its whole traceback as the message;
        # the last line is "<module>.<Type>: <message>".
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def report(error: BaseException | str) -> None:
    """Print ``error: <message>`` on stderr (once: the console log does not repeat it)."""
    text = error if isinstance(error, str) else message_of(error)
    print(f"error: {text}", file=sys.stderr, flush=True)


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A user error raised inside is reported in one line and the process exits with 2."""
    try:
        yield
    except UserError as e:
        report(e)
        sys.exit(EXIT_USER_ERROR)


# ----------------------------------------------------------------------- config checks


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        # Top-level knobs first: the user typed ``temperature=nan``, not attention.temperature.
        items = sorted(node.items(), key=lambda kv: isinstance(kv[1], (Mapping, list)))
        for key, value in items:
            yield from _leaves(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, node


def check_config(cfg: Any) -> None:
    """Refuse a composed config with a missing mandatory value (``???``) or a non-finite
    number anywhere; raise ``ConfigError`` naming the key."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{missing[0]} is required: add {missing[0]}=<value> to the "
                              "command line")
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"config does not resolve: {message_of(e)}") from None
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number; give a finite value")


def integer(value: Any, name: str, low: int | None = None, high: int | None = None, *,
            odd: bool = False, optional: bool = False) -> int | None:
    """``value`` as an int in ``low…high`` (odd if asked), or ConfigError naming ``name``."""
    if value is None and optional:
        return None
    try:
        number = float(value)
        ok = not isinstance(value, bool) and number.is_integer()
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        extra = " (or null)" if optional else ""
        raise ConfigError(f"{name}={value} must be an integer{extra}")
    v = int(number)
    if (low is not None and v < low) or (high is not None and v > high) or (odd and v % 2 == 0):
        if high is None:
            rng = f"≥ {low}" if low is not None else ""
        else:
            rng = f"{low}…{high}"
        kind = "odd integer" if odd else "integer"
        raise ConfigError(f"{name}={value} is impossible: use an {kind} {rng}".rstrip()
                          + (" (or null)" if optional else ""))
    return v


def number(value: Any, name: str, low: float | None = None, *, above: float | None = None,
           below: float | None = None, optional: bool = False) -> float | None:
    """``value`` as a finite float (≥ low, > above, < below), or ConfigError naming it."""
    if value is None and optional:
        return None
    try:
        v = float(value)
        ok = not isinstance(value, bool) and math.isfinite(v)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfigError(f"{name}={value} must be a finite number")
    if (low is not None and v < low) or (above is not None and v <= above) or (
            below is not None and v >= below):
        bounds = [f"≥ {low}" if low is not None else "", f"> {above}" if above is not None
                  else "", f"< {below}" if below is not None else ""]
        raise ConfigError(f"{name}={value} is impossible: use a value "
                          f"{' and '.join(b for b in bounds if b)}")
    return v


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Make sure ``path`` is (or can become) a writable directory, before any work.

    Raises:
        UserError: it is a file, lies under a file, or cannot be written.
    """
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"lies under the file {probe}"
        raise UserError(f"{what} {path} {where}; choose a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror or e}); choose a "
                        "directory you can write to") from None
    return path


# --------------------------------------------------------------------- Hydra entry points


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
            if not _in_multirun():
                report(e)
                sys.exit(EXIT_USER_ERROR)
            report(e)
            mark_failed(_job_dir(), e)
        except Exception as e:
            if not _in_multirun():
                e.__sclip_task__ = True  # type: ignore[attr-defined]  # a bug: keep its traceback
                raise
            # One failed job must not stop a sweep: leave a trace and let the launcher go on.
            log.exception("job failed")
            mark_failed(_job_dir(), e)
        return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Leave ``failed.json`` (error and traceback) where a record would have gone."""
    from sclip_lab.tracking import write_json_atomic

    try:
        write_json_atomic(Path(run_dir) / FAILED_FILE, {
            "status": "failed", "error": f"{type(error).__name__}: {message_of(error)}",
            "traceback": traceback.format_exc()})
    except OSError as e:  # the failure itself is already on the console
        log.warning("could not write %s in %s (%s)", FAILED_FILE, run_dir, e)


def clear_failed(run_dir: Path) -> None:
    """A job or variant that now succeeded drops the failed.json of an earlier attempt."""
    (Path(run_dir) / FAILED_FILE).unlink(missing_ok=True)


def failed_jobs(sweep_dir: Path) -> list[tuple[Path, str]]:
    """``[(failed.json path, its error line)]`` under a sweep directory."""
    out = []
    for path in sorted(Path(sweep_dir).rglob(FAILED_FILE)):
        try:
            error = json.loads(path.read_text()).get("error", "?")
        except (OSError, ValueError):
            error = "unreadable failed.json"
        out.append((path, str(error)))
    return out


class SweepReport(Callback):
    """After a multirun: a summary of the jobs and variants that failed, and exit code 1.

    Jobs catch their own failures (so that one bad job does not stop a sweep) and leave a
    ``failed.json``; a job or variant that later succeeds removes it. This callback reads
    them from the sweep directory once every job has returned, whatever the launcher.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep_dir)
        if not failed:
            return
        print(f"\n{len(failed)} job(s)/variant(s) of this sweep failed:", file=sys.stderr)
        for path, error in failed:
            print(f"  {path.parent}: {error[:200]}", file=sys.stderr)
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
    text = " ".join(parts)
    text = re.sub(r"\s*(full_key|object_type|reference_type): \S*", "", text)
    text = re.sub(r"Available options in '(\w+)':\s*", r"Available options in '\1': ", text)
    return text.strip()


def hydra_entry(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """``@hydra.main`` with the lab's error policy.

    Hydra's own errors (unknown group option or key, bad override syntax, an unusable run
    directory) and the task's user errors are one ``error:`` line with exit code 2; bugs
    keep their traceback.
    """
    import hydra

    from sclip_lab.config import CONF_DIR

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
