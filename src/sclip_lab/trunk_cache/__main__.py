"""``python -m sclip_lab.trunk_cache info|clear DIR``: what a trunk cache holds, or drop it.

``info`` prints, per model/preprocessing folder, its entries and size (and per image);
``clear`` deletes the whole folder (only a folder a run made a trunk cache: it carries
the cache's README.txt). Deleting the folder by hand is just as safe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from sclip_lab.errors import EXIT_USER_ERROR, UserError, report
from sclip_lab.trunk_cache import MANIFEST, MARKER, README, folder_usage, human


def cache_root(path: str) -> Path:
    """A folder that a run made a trunk cache of, or UserError."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"no trunk cache at {root}: the folder does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a trunk cache folder")
    marker = root / MARKER
    if not marker.is_file() or not marker.read_text(errors="replace").startswith(README[:30]):
        raise UserError(f"{root} is not a trunk cache (no sclip_lab {MARKER}); give the folder "
                        "that runs were given as trunk_cache=DIR")
    return root


def info_lines(root: Path) -> list[str]:
    """Per model folder: entries, size, what it caches; then the total."""
    lines, total = [], 0
    for folder in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
        count, size = folder_usage(folder)
        total += size
        try:
            m = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            m = {}
        lines.append(f"{folder.name}: {count} entries, {human(size)} "
                     f"({human(size / max(count, 1))}/image) — {m.get('weights', '?')[:24]}, "
                     f"{m.get('precision')} on {m.get('device')}, short side "
                     f"{m.get('short_side')}, window {m.get('window')}, stride "
                     f"{m.get('stride')}, stored {m.get('dtype')}")
    return lines + [f"total {human(total)} in {root}"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sclip_lab.trunk_cache",
                                description="Show what a trunk cache holds (entries and "
                                "size per model/preprocessing), or delete it.")
    p.add_argument("command", choices=("info", "clear"),
                   help="info: entries and size per model/preprocessing; clear: delete all")
    p.add_argument("dir", help="the folder given to runs as trunk_cache=DIR")
    args = p.parse_args(argv)
    try:
        root = cache_root(args.dir)
        if args.command == "info":
            print("\n".join(info_lines(root)))
            return 0
        count = sum(folder_usage(f)[0] for f in root.iterdir() if f.is_dir())
        shutil.rmtree(root)
        print(f"removed {root} ({count} entries)")
    except (UserError, OSError) as e:
        report(e if isinstance(e, UserError) else f"{args.dir}: {e}")
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
