"""Whether this CPU computes bf16/fp16 natively, and one log line about it (docs/protocol.md §1).

``precision=auto`` stays fp32 on CPU (the same numbers on every machine). A forced bf16 or
fp16 on a CPU without AMX or AVX-512 BF16/FP16 runs in software: PyTorch converts every
matmul, several times slower than fp32 (about 4× for ViT-B/16, benchmarks/bench_eval.py
(e)). ``advise`` says so once per process; on a CPU that has the instructions it says
instead that bf16 is available and faster.

``PRECISIONS`` and ``resolve`` are the one table and resolver of precision names, for CLIP
(``model.load_clip``) and the proxy backbones (``proxy.load_proxy``) alike.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from sclip_lab.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# torch.cpu's private ISA probes that mean native matrix support, per precision.
NATIVE_PROBES = {"bf16": ("_is_amx_tile_supported", "_is_avx512_bf16_supported"),
                 "fp16": ("_is_amx_fp16_supported", "_is_avx512_fp16_supported")}


def _probe(name: str) -> bool:
    """``torch.cpu.<name>()``; False where this torch lacks the (private) probe."""
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if callable(fn) else False
    except Exception:  # noqa: BLE001 - a broken probe means "not known to be native"
        return False


def cpu_native(precision: str) -> bool:
    """True when this CPU has matrix instructions for ``precision`` (fp32 always)."""
    return precision == "fp32" or any(_probe(n) for n in NATIVE_PROBES.get(precision, ()))


@functools.cache
def advise(precision: str, device_type: str, notes: Path | None = None) -> None:
    """Log, once per process and precision, what ``precision`` (as requested, ``auto``
    included) costs on a CPU: a warning when it is emulated, an info line when bf16 is
    native and would be faster than the fp32 that ``auto`` picks. Silent on GPUs. The info
    line (a tip, not a problem) is said once per ``notes`` folder (the cache_dir): a marker
    file there keeps later commands quiet."""
    if device_type != "cpu" or precision == "fp32":
        return
    if precision == "auto":
        if cpu_native("bf16") and not _noted(notes, "precision-auto-bf16"):
            log.info("precision=auto is fp32 on CPU (reproducible numbers); this CPU computes "
                     "bf16 natively, so precision=bf16 is faster (predictions may move "
                     "slightly)")
    elif not cpu_native(precision):
        log.warning("precision=%s is emulated on this CPU (no AMX or AVX-512 %s): about 4× "
                    "slower than fp32 here; use precision=fp32 (or auto)", precision,
                    precision.upper())
    else:
        log.info("precision=%s: this CPU computes it natively (AMX or AVX-512), faster than "
                 "fp32", precision)


def _noted(folder: Path | None, name: str) -> bool:
    """Whether ``name`` was already said for ``folder`` (and mark it said from now on)."""
    if folder is None:
        return False
    marker = Path(folder).expanduser() / f".said-{name}"
    if marker.exists():
        return True
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache: say it every time rather than fail
        pass
    return False


def resolve(precision: str | torch.dtype, device: torch.device,
            error: type[Exception] = ConfigError, notes: Path | None = None) -> str:
    """The precision name (a key of ``PRECISIONS``) that ``precision`` means on ``device``.

    ``auto`` is fp16 on CUDA and fp32 elsewhere (reproducible numbers on CPU); a torch dtype
    (e.g. the CLIP encoder's, for a proxy that follows it) is its name. Logs once what a
    CPU precision costs (``advise``).

    Args:
        precision: ``auto`` | fp32 | fp16 | bf16, or one of their torch dtypes.
        device: where the model runs.
        error: the exception raised for any other value (the caller's room's user error).
        notes: a folder where tips already given are marked (``advise``; the cache_dir).

    Example:
        >>> resolve("auto", torch.device("cpu")), resolve(torch.bfloat16, torch.device("cpu"))
        ('fp32', 'bf16')
    """
    if isinstance(precision, torch.dtype):
        names = {dtype: name for name, dtype in PRECISIONS.items()}
        if precision not in names:
            raise error(f"precision={precision} is not one of {'|'.join(PRECISIONS)} "
                        f"({', '.join(map(str, names))})")
        precision = names[precision]
    if precision != "auto" and precision not in PRECISIONS:
        raise error(f"precision={precision!r} is not one of auto|{'|'.join(PRECISIONS)}")
    advise(precision, device.type, None if notes is None else Path(notes))
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision
