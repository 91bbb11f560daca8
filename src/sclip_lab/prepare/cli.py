"""The command line: ``python -m sclip_lab.prepare <benchmark> [key=value ...]``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from sclip_lab.data import DataError
from sclip_lab.errors import EXIT_USER_ERROR, UserError, report
from sclip_lab.prepare.catalogue import benchmarks

_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# option on the command line -> keyword of prepare()
_OPTIONS = {"data_root": "data_root", "from": "source_dir", "train": "with_train",
            "force": "force"}


def usage() -> str:
    return ("usage: python -m sclip_lab.prepare <benchmark> [data_root=DIR] [from=DIR] "
            "[train=true] [force=true]\n  benchmarks: " + ", ".join(benchmarks()))


class ArgumentError(DataError):
    """A bad command line (the usage hint follows the message)."""


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``<benchmark> key=value ...`` -> options (ArgumentError for anything unknown)."""
    names = [a for a in argv if "=" not in a]
    if len(names) != 1:
        raise ArgumentError("give exactly one benchmark" + (f" (got {', '.join(names)})"
                                                        if names else ""))
    name = names[0]
    if name not in benchmarks():
        raise ArgumentError(f"unknown benchmark {name!r}; choose one of: "
                            f"{', '.join(benchmarks())}")
    opts: dict[str, Any] = {"name": name, "data_root": None, "source_dir": None,
                            "with_train": False, "force": False}
    for arg in argv:
        if "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if key not in _OPTIONS:
            raise ArgumentError(f"unknown option {key}=; options: {', '.join(_OPTIONS)}")
        if _OPTIONS[key] in ("with_train", "force"):
            if value.lower() not in _FLAGS:
                raise ArgumentError(f"{key}={value} must be true or false")
            opts[_OPTIONS[key]] = _FLAGS[value.lower()]
        else:
            opts[_OPTIONS[key]] = value or None
    return opts


def run(argv: Sequence[str] | None, prepare: Callable[..., Any]) -> int:
    """Parse ``argv`` (default: ``sys.argv``), call ``prepare`` -> the exit code.

    ``prepare`` is passed in by the package, which imports this module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(usage())
            return 0 if argv else 2
        opts = parse_args(argv)
        prepare(opts.pop("name"), **opts)
    except UserError as e:
        report(f"{e} (python -m sclip_lab.prepare --help)" if isinstance(e, ArgumentError)
               else e)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0
