"""Files that are never seen half-written."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one
    rename, on failure it is removed: a reader never sees half a file. The file gets the
    usual permissions of a user's file (mkstemp alone would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 22
                ) -> str:
    """Hex digest of a file's bytes (a weights file's identity, a download's checksum)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor], skip: Callable[[str], bool] = lambda _: False
                 ) -> str:
    """blake2b of a state dict's names and raw tensor bytes in name order (a weights
    identity where there is no file or hub tag); names for which ``skip`` is true are
    left out. Text-embedding cache keys are made of it: keep it byte for byte."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(state.items()):
        if skip(name):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write strict JSON atomically (``atomic_target``); non-finite floats become null,
    as JSON has no NaN."""
    with atomic_target(path) as tmp, open(tmp, "w") as f:
        json.dump(_finite(payload), f, indent=2, default=_jsonable, allow_nan=False)


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float (also numpy scalars and arrays) replaced by None."""
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _finite(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _jsonable(obj: Any) -> Any:
    return str(obj)

