"""Where the Hydra configs live, the resolvers they use, and how a variant entry reads."""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import sclip_lab.data  # noqa: F401 - registers dataset/base_dataset, the schema conf/dataset/ extends
from sclip_lab.backbones import backbone_dir, native_stride, native_window
from sclip_lab.errors import ConfigError
from sclip_lab.head_spec import HeadSpec, head_spec_of
from sclip_lab.knobs import BLOCK_KNOBS, TRUNK_KNOBS

log = logging.getLogger("sclip_lab")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PAPER_SHORT_SIDE = {"cityscapes": 560}
# The paper knobs run.yaml offers at the top level; the groups read them by interpolation.
TOP_KNOBS = ("n", "trial", "temperature", "kernel", "window", "layer", "sigma")


def paper_short_side(dataset: str) -> int:
    """The paper's Table 1 short side: 336, Cityscapes 560 (docs/protocol.md §9)."""
    return PAPER_SHORT_SIDE.get(dataset, 336)


_WARNED_WINDOW: set[Any] = set()  # the deprecation warning once per process and value


def local_kernel(window: int | None, kernel: int) -> int:
    """attention=local's size: ``kernel``, or the deprecated top-level ``window=`` if given.

    Registered without OmegaConf's resolver cache: that cache is keyed by the unresolved
    argument text (``${window},${kernel}``), so a second composition in the same process
    (predict, visualize, ``variants=``) would get the first one's value."""
    if window is None:
        return kernel
    if window in _WARNED_WINDOW:
        return window
    _WARNED_WINDOW.add(window)
    log.warning("window=%s names the local attention size by its old name: write kernel=%s "
                "(window= will go; preprocess.window is the crop)", window, window)
    return window


def by_dataset(name: str, default: Any, table: Mapping[str, Any] | None = None) -> Any:
    """A protocol's per-benchmark value: ``table[name]``, else ``default``
    (``${by_dataset:${dataset.name},336,{cityscapes:560}}``)."""
    return (table or {}).get(name, default)


def window_of(window: int | None, name: str, whole_image: Sequence[str] | None) -> int | None:
    """The sliding window of a protocol, or None (the whole image in one window) for the
    benchmarks it evaluates whole."""
    return None if name in (whole_image or ()) else window


def variant_label(config: Mapping[str, Any], spec: HeadSpec | None = None) -> str:
    """A variant named fully by what sets it apart (``HeadSpec.label``: the attention, its
    projection set, knobs that differ from their defaults, its proxy backbone,
    post-processing), then a non-default protocol — ``csa random n=16``, ``local
    kernel=5``, ``naclip pamr protocol=naclip``, ``proxy dino_vitb8 protocol=proxyclip``."""
    if spec is None:
        try:
            spec = head_spec_of(config, require_proxy=False)
        except ConfigError:  # an unknown variant is named as given
            spec = None
    parts = spec.label_parts() if spec is not None else [str(config["attention"]["name"])]
    protocol = (config.get("protocol") or {}).get("name", "sclip")
    parts += [f"protocol={protocol}"] if protocol != "sclip" else []
    return " ".join(parts)


def label_dir(label: str) -> str:
    """A folder name for a variant label: ``csa random n=16`` -> ``csa-random-n=16``."""
    return re.sub(r"[^A-Za-z0-9.=+]+", "-", label).strip("-") or "default"


def _variant_dir(*, _root_: DictConfig) -> str:
    """``${variant_dir:}``: the composed config's variant as a folder name."""
    sections = {k: OmegaConf.to_container(_root_[k], resolve=True) if _root_.get(k) else None
                for k in ("attention", "projection", "postprocess", "protocol", "proxy")}
    return label_dir(variant_label(sections))


def register_attention_schema() -> None:
    """``attention/base_attention``: the block knobs every attention file extends
    (``defaults: [base_attention, _self_]``; null = the variant's own block) and the trunk
    knob ``pos_embed`` (null = the default rule; a method's preset sets its own)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="attention", name="base_attention",
                                 node={k.name: None for k in (*BLOCK_KNOBS, *TRUNK_KNOBS)})


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("paper_short_side"):
        OmegaConf.register_new_resolver("paper_short_side", paper_short_side)
    for name, fn in (("by_dataset", by_dataset), ("window_of", window_of),
                     ("native_window", native_window), ("native_stride", native_stride),
                     ("backbone_dir", backbone_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("variant_dir"):
        OmegaConf.register_new_resolver("variant_dir", _variant_dir)
    if not OmegaConf.has_resolver("local_kernel"):  # never cached: see local_kernel
        OmegaConf.register_new_resolver("local_kernel", local_kernel)


def _reads(node: Any, ref: str) -> bool:
    if isinstance(node, Mapping):
        return any(_reads(v, ref) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_reads(v, ref) for v in node)
    return isinstance(node, str) and ref in node


def readers_of(key: str) -> list[str]:
    """The group options whose files read the top-level ``key`` (``projection=random``)."""
    ref = f"${{{key}}}"
    return sorted(f"{path.parent.name}={path.stem}" for group in ("attention", "projection",
                                                                   "postprocess")
                  for path in (CONF_DIR / group).glob("*.yaml") if ref in path.read_text())


def unused_knobs(configs: Sequence[Any], overrides: Sequence[str]) -> list[str]:
    """One warning per top-level knob given in ``overrides`` (``n=16``) that none of the
    composed ``configs`` reads: e.g. ``n`` without ``projection=random``."""
    out = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or "." in key or key not in TOP_KNOBS:
            continue
        ref = f"${{{key}}}"
        if any(_reads({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items()
                       if k not in TOP_KNOBS and k != "hydra"}, ref) for cfg in configs):
            continue
        readers = readers_of(key)
        verb = "reads" if len(readers) == 1 else "read"
        out.append(f"{override} has no effect here (attention={configs[0].attention.name}): "
                   f"only {', '.join(readers) or 'no option'} {verb} {key}")
    return out


def variant_overrides(entry: str) -> list[str]:
    """``"local kernel=5"`` or ``"attention=local kernel=5"`` -> Hydra overrides."""
    tokens = shlex.split(str(entry))
    if not tokens:
        raise ConfigError("a variant entry is empty; write e.g. 'attention=local kernel=5'")
    if "=" not in tokens[0]:
        tokens[0] = f"attention={tokens[0]}"
    return tokens


register_resolvers()
register_attention_schema()
