"""What in a trunk-cache folder is the cache's own (the only files it adopts, counts or
deletes), and what they weigh.

A run writes, under ``DIR``: the marker ``README.txt`` (text starting with ``MARKER_HEAD``),
model folders ``<arch>-<16 hex>``, and in those ``manifest.json`` and entries
``<32 hex>.safetensors``, each first as a temporary file ``.<stem>-<random>.<suffix>``
beside it (``files.atomic_target``). Anything else there is a user's, and stays.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sclip_lab.errors import ConfigError, check_writable_dir

MARKER = "README.txt"
MARKER_HEAD = "sclip_lab trunk cache ("  # how the marker's text starts, in every format
MANIFEST = "manifest.json"
SUFFIX = ".safetensors"

# mkstemp's random part is made of [a-z0-9_], i.e. \w
ROOT_FILE = re.compile(r"\.README-\w+\.txt")  # a marker being written (the marker: by text)
MODEL_DIR = re.compile(r".+-[0-9a-f]{16}")
MODEL_FILE = re.compile(r"manifest\.json|\.manifest-\w+\.json"
                        r"|[0-9a-f]{32}\.safetensors|\.[0-9a-f]{32}-\w+\.safetensors")


def is_marker(path: Path) -> bool:
    """True for the cache's own ``README.txt`` (a user's file of that name is not)."""
    try:
        return path.is_file() and not path.is_symlink() and \
            path.read_text(errors="replace").startswith(MARKER_HEAD)
    except OSError:
        return False


def is_cache(root: Path) -> bool:
    """True when a run has made ``root`` a trunk cache (its marker is there)."""
    return is_marker(root / MARKER)


def read_manifest(path: Path) -> dict | None:
    """A model folder's manifest, or None when it is missing, unreadable or not an object."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return m if isinstance(m, dict) else None


def _own_file(path: Path, pattern: re.Pattern) -> bool:
    return path.is_file() and not path.is_symlink() and bool(pattern.fullmatch(path.name))


def _model_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and bool(MODEL_DIR.fullmatch(path.name))


def foreign(root: Path) -> list[Path]:
    """What under ``root`` the cache did not write (in a model folder too), sorted."""
    out = []
    for item in sorted(root.iterdir()):
        if _model_dir(item):
            out += [f for f in sorted(item.iterdir()) if not _own_file(f, MODEL_FILE)]
        elif not (item.name == MARKER and is_marker(item) or _own_file(item, ROOT_FILE)):
            out.append(item)
    return out


def names(paths: list[Path], root: Path, most: int = 3) -> str:
    """``a, b/c, d and 4 more``: a few paths relative to ``root``, for one line."""
    shown = ", ".join(str(p.relative_to(root)) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def check_adoptable(root: str | Path) -> Path:
    """``root`` as a folder that ``trunk_cache=DIR`` may use: missing, empty, a trunk cache
    already (its marker), or holding only files of the cache's own naming (a writer's
    temporary marker). A missing folder or a file is left to ``check_writable_dir``.

    Raises:
        ConfigError: a folder of other files: the cache would mix its files with a user's,
            and ``clear`` could not tell them apart.
    """
    root = Path(root).expanduser()
    try:
        if not root.is_dir() or is_cache(root) or not (others := foreign(root)):
            return root
    except OSError:  # unreadable: the writability check (or the first write) reports it
        return root
    raise ConfigError(f"trunk_cache={root} is a folder of other files ({names(others, root)}),"
                      f" not a trunk cache; give an empty or new folder, e.g. "
                      f"trunk_cache={root / 'trunk_cache'}")


def check_cache_dir(path: str | Path) -> Path:
    """The cheap check of ``trunk_cache=DIR`` before any work: a folder the cache may adopt
    (``check_adoptable``) and can write to (``check_writable_dir``); raises ConfigError or
    UserError."""
    return check_writable_dir(check_adoptable(path), "trunk_cache")


def clear(root: Path) -> tuple[int, list[Path]]:
    """Delete what the cache wrote under ``root``: its entries, manifests and temporary
    files, the model folders and ``root`` itself once empty, the marker last (an interrupted
    clear leaves a cache that can be cleared again) -> (entries deleted, what was left).

    Raises:
        OSError: a file could not be deleted.
    """
    removed, left = 0, []
    for item in sorted(root.iterdir()):
        if not _model_dir(item):
            continue
        for f in sorted(item.iterdir()):
            if _own_file(f, MODEL_FILE):
                removed += f.suffix == SUFFIX and not f.name.startswith(".")
                f.unlink()
            else:
                left.append(f)
        if not any(item.iterdir()):
            item.rmdir()
    for item in sorted(root.iterdir()):
        if _own_file(item, ROOT_FILE):
            item.unlink()
        elif item.name != MARKER and not _model_dir(item):
            left.append(item)
    (root / MARKER).unlink(missing_ok=True)
    if not any(root.iterdir()):
        root.rmdir()
    return removed, sorted(left)


def human(size: float) -> str:
    """``3.6 MB``: decimal units, as disks are sold."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def folder_usage(folder: Path) -> tuple[int, int]:
    """(entries, bytes) of one model folder (temporary files of running writers left out)."""
    files = [p for p in folder.glob(f"*{SUFFIX}") if not p.name.startswith(".")]
    return len(files), sum(p.stat().st_size for p in files if p.exists())
