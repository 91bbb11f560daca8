"""Upload offline W&B runs: ``python -m sclip_lab.sync [ROOT ...] [--dry-run]``.

Evaluations log offline when W&B has no credentials or cannot be reached; their runs stay
under each run directory (``<run dir>/wandb/offline-run-*``). This finds the ones not yet
uploaded under ``ROOT`` (default: ``outputs`` and ``multirun``) and hands them to
``wandb sync``, which marks each as synced (``*.wandb.synced``) so that a second call
uploads nothing twice. Log in first (``wandb login``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from sclip_lab.errors import EXIT_USER_ERROR, report
from sclip_lab.tracking import wandb_logged_in

DEFAULT_ROOTS = ("outputs", "multirun")


def pending_runs(roots: Iterable[Path]) -> list[Path]:
    """Offline W&B run folders under ``roots`` with no ``*.wandb.synced`` marker."""
    found = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.rglob("offline-run-*")
                      if p.is_dir() and not any(p.glob("*.wandb.synced"))]
    return sorted(found)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sclip_lab.sync",
                                description=__doc__.split("\n")[0])
    p.add_argument("roots", nargs="*", type=Path, default=[Path(r) for r in DEFAULT_ROOTS],
                   help="folders searched at any depth (default: outputs multirun)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, upload nothing")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing and len(missing) == len(args.roots):
        report(f"no such folder: {', '.join(missing)}; give the run or sweep folders")
        return EXIT_USER_ERROR
    runs = pending_runs(args.roots)
    print(f"{len(runs)} offline W&B run(s) not yet uploaded")
    for run in runs:
        print(f"  {run}")
    if args.dry_run or not runs:
        return 0
    if not wandb_logged_in():
        report("W&B has no credentials: run `wandb login` (or set WANDB_API_KEY), then sync")
        return EXIT_USER_ERROR
    wandb_cli = shutil.which("wandb")
    if wandb_cli is None:
        report("the wandb command is not on PATH; activate the environment sclip_lab is in")
        return EXIT_USER_ERROR
    return subprocess.run([wandb_cli, "sync", *map(str, runs)]).returncode


if __name__ == "__main__":
    sys.exit(main())
