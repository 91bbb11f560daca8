"""How the lab fails: one ``error: ...`` line naming the fix, exit code 2.

A ``UserError`` is a problem with what the user gave (a config value, data on disk, a
weights file, a path); its message is one line that says what to change. Anything else is
a bug in the lab and keeps its traceback (exit code 1). Hydra entry points are wrapped by
``cli.hydra_entry``; argparse ones call ``report`` themselves. This module is the floor of
the package: it imports nothing from it.

Exit codes: 0 done, 1 a bug, a sweep with failed jobs or a run with failed variants, 2 a
user error, 130 / 143 interrupted (SIGINT / SIGTERM).

An error line stays short (``MAX_LINE``): our words for the cause and the fix. A library's
own long explanation is kept out of it and shown only with ``--verbose`` (or
``SCLIP_VERBOSE=1``, or ``HYDRA_FULL_ERROR=1`` set by the user).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("sclip_lab")

EXIT_USER_ERROR = 2
EXIT_FAILED_JOBS = 1
MAX_LINE = 300  # characters of an error line; the rest only with --verbose
# Read before cli.hydra_entry sets HYDRA_FULL_ERROR for its own use: only the user's counts.
_USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


class UserError(Exception):
    """A problem with the user's input; the message is one line that names the fix.

    ``detail``: a library's own text behind it (printed only with ``--verbose``)."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str = "", detail: str | None = None):
        super().__init__(message)
        self.detail = detail


class PartialFailure(UserError):
    """Some variants of a run failed (each has its failed.json), the others finished."""

    exit_code = EXIT_FAILED_JOBS


class Interrupted(BaseException):
    """SIGINT or SIGTERM: the command ends with one line and exit code 128 + signal.

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` (a
    sweep job's failure guard) turns a user's Ctrl-C into a failed job that goes on."""

    def __init__(self, signum: int, progress: str = ""):
        super().__init__(signum, progress)
        self.signum = signum
        self.progress = progress

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        done = f"{self.progress}; " if self.progress else ""
        return (f"interrupted: {done}nothing recorded for the unfinished variants; rerun "
                "the same command to evaluate them (records already written are kept)")


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name closest to a misspelt ``word`` (difflib), or None if none is close:
    for "did you mean …?" in error lines."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return close[0] if close else None


def verbose() -> bool:
    """Whether the user asked for libraries' full messages and tracebacks."""
    return ("--verbose" in sys.argv[1:] or os.environ.get("SCLIP_VERBOSE") == "1"
            or _USER_FULL_ERROR)


def brief(error: BaseException, limit: int = 100) -> str:
    """A library error in a few words for an error line: its type and first sentence,
    cut to ``limit`` characters (the whole text is for ``--verbose``)."""
    text = message_of(error)
    first = re.split(r"(?<=[.;:])\s", text, maxsplit=1)[0].rstrip(".;:")
    return f"{type(error).__name__}: {clip(first, limit)}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``"1 image"``, ``"2 images"``: a count with its noun (``many`` where it is not
    ``word + "s"``).

    Example:
        >>> plural(1, "image"), plural(0, "name"), plural(2, "class", "classes")
        ('1 image', '0 names', '2 classes')
    """
    return f"{count} {word}" if count == 1 else f"{count} {many or word + 's'}"


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "…" where it was cut."""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


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


def short_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` within ``limit`` characters: its start and its end (where the fix is),
    the middle elided."""
    if len(text) <= limit:
        return text
    hint = " … (--verbose: the whole message) … "
    head = (limit - len(hint)) * 2 // 3
    return text[:head].rstrip() + hint + text[-(limit - len(hint) - head):].lstrip()


def report(error: BaseException | str) -> None:
    """Print ``error: <message>`` on stderr (once: the console log does not repeat it),
    within ``MAX_LINE`` characters unless ``--verbose``; then a library's own text."""
    text = error if isinstance(error, str) else message_of(error)
    loud = verbose()
    print(f"error: {text if loud else short_line(text)}", file=sys.stderr, flush=True)
    if loud and isinstance(error, BaseException):
        detail = getattr(error, "detail", None) or (
            message_of(error.__cause__) if error.__cause__ is not None else None)
        if detail:
            print(f"detail: {detail}", file=sys.stderr, flush=True)


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
