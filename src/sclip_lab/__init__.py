"""sclip_lab: training-free open-vocabulary semantic segmentation with CLIP (SCLIP and kin).

The Python API (``sclip_lab.api``)::

    import sclip_lab

    sclip_lab.methods()                           # the methods, their knobs and defaults
    seg = sclip_lab.load("naclip", sigma=3)       # -> sclip_lab.Segmenter
    pred = seg.segment("photo.jpg")               # (H, W) int64 class map
    scores = seg.evaluate("voc21", data_root="data", limit=50)

``import sclip_lab`` alone loads nothing heavy: the names below are imported on first use
(PEP 562), so a command line that only needs ``__version__`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (a module itself where the name is one)
_LAZY = {
    "load": "sclip_lab.api",
    "load_config": "sclip_lab.api",
    "methods": "sclip_lab.api",
    "Method": "sclip_lab.api",
    "Segmenter": "sclip_lab.api",
    "ConfigError": "sclip_lab.errors",
    "UserError": "sclip_lab.errors",
    "images": "sclip_lab.images",
    "viz": "sclip_lab.viz",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sclip_lab' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"sclip_lab.{name}" else getattr(module, name)
    globals()[name] = value  # once: later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
