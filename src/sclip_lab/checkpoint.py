"""A weights file's state dict into a built model, with one line saying what does not fit:
the one loader of CLIP (``model.load_clip``) and the proxy backbones (``proxy.load_proxy``).

A file of another architecture is the usual user mistake (ViT-L weights for a ViT-B config,
a DINO file for MAE), so a shape mismatch or a missing tensor is a user error naming the
fix, raised before anything is copied (no half-loaded model). Keys the model does not have
(a SAM checkpoint's decoders, OpenAI's extra buffers) are one warning: the tower is whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from torch import Tensor, nn

from sclip_lab.errors import UserError

log = logging.getLogger(__name__)



def mismatches(model: nn.Module, state: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """``(shape mismatches, missing keys)`` of ``state`` against ``model``'s own tensors
    (parameters and persistent buffers), each in the order the model or the file lists them.

    Example:
        >>> import torch
        >>> lin = nn.Linear(2, 3)
        >>> mismatches(lin, {"weight": torch.zeros(3, 3)})
        (['weight'], ['bias'])
    """
    own = model.state_dict()
    shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    return shape, missing


def load_state(model: nn.Module, state: Mapping[str, Tensor], source: str | os.PathLike,
               target: str, fix: str, *, error: type[UserError] = UserError,
               assign: bool = False) -> None:
    """Load ``state`` into ``model``, which it must fill completely at the model's shapes.

    Args:
        model: the built model (on the meta device with ``assign=True``).
        state: the converted state dict.
        source: the file it came from (messages).
        target: what it must fit, as the user named it (``model.arch=ViT-B-16``).
        fix: the end of the error line: what to pass instead.
        error: the caller's room's user error.
        assign: take the file's tensors themselves (a meta-built model) instead of copying
            them into the model's (which also casts them to the model's dtype).

    Raises:
        error: ``<source> does not fit <target>: N shape mismatches (e.g. k), M missing keys
            (e.g. k); <fix>`` (a kind with none left out; one key each, so that the line
            keeps within ``errors.MAX_LINE``), every key in its ``detail``.

    Example:
        >>> import torch
        >>> lin = nn.Linear(2, 3)
        >>> load_state(lin, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, "w.pt",
        ...            "a 2→3 layer", "pass its weights")
        >>> float(lin.weight.detach().sum())
        6.0
    """
    shape, missing = mismatches(model, state)
    if shape or missing:
        kinds = [f"{len(keys)} {kind} (e.g. {keys[0]})"
                 for kind, keys in (("shape mismatches", shape), ("missing keys", missing))
                 if keys]
        raise error(f"{source} does not fit {target}: {', '.join(kinds)}; {fix}",
                    detail=f"shape mismatches: {shape}; missing keys: {missing}")
    result = model.load_state_dict(state, strict=False, assign=assign)
    if result.unexpected_keys:
        log.warning("%s: ignored %d unexpected keys (e.g. %s)", source,
                    len(result.unexpected_keys), ", ".join(result.unexpected_keys[:3]))
