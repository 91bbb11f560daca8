"""Extraction of the needed members of a zip or tar archive, never outside its target."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from sclip_lab.data import DataError


def _safe_target(dest: Path, name: str) -> Path | None:
    """Where member ``name`` goes under ``dest``; None for names that would escape it."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        return None
    return dest.joinpath(*pure.parts)


def _wanted(name: str, prefixes: Sequence[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def _write(dest: Path, name: str, open_member: Callable[[], IO[bytes]]) -> bool:
    """Copy member ``name`` under ``dest``; False (nothing written) if it would escape."""
    target = _safe_target(dest, name)
    if target is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_member() as src, target.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return True


def extract(archive: Path, dest: Path, prefixes: Sequence[str]) -> int:
    """Extract the regular files of ``archive`` (tar or zip) under ``prefixes`` into ``dest``.

    Zip members are CRC-checked while read. Links, devices and names escaping ``dest``
    are skipped.

    Returns:
        the number of files written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = [i for i in zf.infolist()
                         if not i.is_dir() and _wanted(i.filename, prefixes)]
                for info in tqdm(infos, desc=f"extract {archive.name}", unit="file",
                                 leave=False):
                    written += _write(dest, info.filename, partial(zf.open, info))
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf, tqdm(desc=f"extract {archive.name}",
                                                    unit="file", leave=False) as bar:
                for member in tf:  # streamed: no full listing of a 2 GB tar first
                    if member.isfile() and _wanted(member.name, prefixes) and _write(
                            dest, member.name, partial(tf.extractfile, member)):
                        written += 1
                        bar.update(1)
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive; delete it and "
                            "prepare again")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive} is damaged ({type(e).__name__}: {e}); delete it and "
                        "prepare again") from None
    if not written:
        raise DataError(f"{archive} holds no file under {', '.join(prefixes)}: not the "
                        "expected archive")
    return written
