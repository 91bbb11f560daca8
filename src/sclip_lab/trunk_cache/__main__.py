"""``python -m sclip_lab.trunk_cache info|clear DIR``: what a trunk cache holds, or drop it.

``info`` prints, per model/preprocessing folder, its entries and size (and per image);
``clear`` deletes what runs wrote there (entries, manifests, the README.txt marker, the
folders once empty; only in a folder that carries the marker) and keeps, and names, any
other file. Deleting the folder by hand is just as safe.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sclip_lab.errors import EXIT_USER_ERROR, UserError, report
from sclip_lab.trunk_cache import MANIFEST, MARKER, folder_usage, human
from sclip_lab.trunk_cache.owned import MODEL_DIR, clear, is_cache, names, read_manifest


def cache_root(path: str) -> Path:
    """A folder that a run made a trunk cache of, or UserError."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"no trunk cache at {root}: the folder does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a trunk cache folder")
    if not is_cache(root):
        raise UserError(f"{root} is not a trunk cache (no sclip_lab {MARKER}); give the folder "
                        "that runs were given as trunk_cache=DIR")
    return root


def info_lines(root: Path) -> list[str]:
    """Per model folder: entries, size, what it caches; then the total."""
    lines, total = [], 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and MODEL_DIR.fullmatch(p.name)):
        count, size = folder_usage(folder)
        total += size
        line = (f"{folder.name}: {count} entries, {human(size)} "
                f"({human(size / max(count, 1))}/image)")
        m = read_manifest(folder / MANIFEST) or {}
        try:
            line += (f" — {m['weights'][:24]}, {m['precision']} on {m['device']}, short side "
                     f"{m['short_side']}, window {m['window']}, stride {m['stride']}, "
                     f"stored {m['dtype']}")
        except (KeyError, TypeError):  # the next run of this model rewrites it
            line += f" — {MANIFEST} missing or damaged (the next run with this model rewrites it)"
        lines.append(line)
    return lines + [f"total {human(total)} in {root}"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sclip_lab.trunk_cache",
                                description="Show what a trunk cache holds (entries and "
                                "size per model/preprocessing), or delete it.")
    p.add_argument("command", choices=("info", "clear"),
                   help="info: entries and size per model/preprocessing; clear: delete what "
                   "runs wrote (files of others stay)")
    p.add_argument("dir", help="the folder given to runs as trunk_cache=DIR")
    args = p.parse_args(argv)
    try:
        root = cache_root(args.dir)
        if args.command == "info":
            print("\n".join(info_lines(root)))
            return 0
        count, left = clear(root)
        if not left:
            print(f"removed {root} ({count} entries)")
        else:  # a user's files, never the cache's: they stay, and so does their folder
            print(f"removed {count} entries and the cache's files from {root}; kept "
                  f"{len(left)} file(s) it did not write: {names(left, root)}")
    except (UserError, OSError) as e:
        report(e if isinstance(e, UserError) else f"{args.dir}: {e}")
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
