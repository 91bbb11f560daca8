"""Extraction of the needed members of a zip or tar archive, never outside its target.

A full disk is the disk's fault, never the archive's: the members' declared sizes are
checked against the free space before anything is written, a write that still fails
(ENOSPC, EDQUOT) is reported as such, and the archive is always kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
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
    """Copy member ``name`` under ``dest``; False (nothing written) if it would escape. A
    file whose copy fails is removed: a later run never meets it half-written."""
    target = _safe_target(dest, name)
    if target is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open_member() as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return True


# The errors of a full disk or an exhausted quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.3g} GB"


def check_space(dest: Path, members: Iterable[tuple[str, int]]) -> None:
    """Refuse, before anything is written, members ``(name, declared size)`` that cannot fit
    in the free space under ``dest`` (each rounded up to the filesystem's block, less the
    files of the same name they would replace)."""
    block = os.statvfs(dest).f_frsize or 4096
    need = 0
    for name, size in members:
        target = _safe_target(dest, name)
        if target is not None:
            need += -(-size // block) * block
            need -= -(-target.stat().st_size // block) * block if target.is_file() else 0
    free = shutil.disk_usage(dest).free
    if need > free:
        raise DataError(f"no space left on the device: need {_gb(need)}, free {_gb(free)} at "
                        f"{dest}; free space or set data_root=… to a larger disk, then "
                        "prepare again")


def _is_compressed(archive: Path) -> bool:
    """A gzip, bzip2 or xz tar: listing its sizes would mean decompressing it twice."""
    with archive.open("rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def extract(archive: Path, dest: Path, prefixes: Sequence[str]) -> int:
    """Extract the regular files of ``archive`` (tar or zip) under ``prefixes`` into ``dest``.

    Zip members are CRC-checked while read. Links, devices and names escaping ``dest``
    are skipped. The declared sizes are checked against the free space first (a
    compressed tar's are not: that would decompress it twice), and a full disk is reported
    as one ``DataError`` that keeps the archive.

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
                check_space(dest, ((i.filename, i.file_size) for i in infos))
                for info in tqdm(infos, desc=f"extract {archive.name}", unit="file",
                                 leave=False):
                    written += _write(dest, info.filename, partial(zf.open, info))
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf, tqdm(desc=f"extract {archive.name}",
                                                    unit="file", leave=False) as bar:
                if not _is_compressed(archive):  # headers only: a plain tar is seeked through
                    check_space(dest, ((m.name, m.size) for m in tf.getmembers()
                                       if m.isfile() and _wanted(m.name, prefixes)))
                for member in tf:  # the listing above, or a compressed tar streamed
                    if member.isfile() and _wanted(member.name, prefixes) and _write(
                            dest, member.name, partial(tf.extractfile, member)):
                        written += 1
                        bar.update(1)
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive; delete it and "
                            "prepare again")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno in NO_SPACE:  # the disk's fault: keep the archive
            raise DataError(f"no space left on the device: free {_gb(shutil.disk_usage(dest).free)}"
                            f" at {dest} while extracting {archive.name} (kept: it is not "
                            "damaged); free space or set data_root=… to a larger disk, then "
                            "prepare again") from None
        raise DataError(f"{archive} is damaged ({type(e).__name__}: {e}); delete it and "
                        "prepare again") from None
    if not written:
        raise DataError(f"{archive} holds no file under {', '.join(prefixes)}: not the "
                        "expected archive")
    return written
