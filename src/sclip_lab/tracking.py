"""Where results go: a local ``result.json`` always, a W&B run unless ``logger=none``.

W&B never prompts: the mode is decided before ``wandb.init`` (online only when the user
is logged in, i.e. ``WANDB_API_KEY`` or a netrc entry exists; ``WANDB_MODE`` wins).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import platform
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
PACKAGES = ("torch", "torchvision", "open_clip_torch", "torchmetrics", "hydra-core", "wandb",
            "numpy", "opencv-python-headless", "sclip_lab")


def summary_of(config: Mapping[str, Any], metrics: Mapping[str, Any],
               info: Mapping[str, Any] | None = None, num_images: int | None = None
               ) -> dict[str, Any]:
    """The flat row that sweeps and tables read (one per record, also the W&B summary).

    Args:
        config: a resolved run config.
        metrics: ``mIoU``, ``aAcc``, ``mAcc``.
        info: what loading resolved (``arch``, ``precision``); default: the config's.
        num_images: images evaluated.
    """
    info = info or {}
    att, proj = config["attention"], config.get("projection")
    name = att["name"]
    # csa without a projection group runs its default, qk (conf/run.yaml).
    projection = (proj or {"name": "qk"}) if name == "csa" else None
    random_proj = projection is not None and projection["name"] == "random"
    return {
        "dataset": config["dataset"]["name"],
        "model": info.get("arch", config["model"]["arch"]),
        "pretrained": str(config["model"]["pretrained"]),
        "attention": name,
        "projection": None if projection is None else projection["name"],
        "n": projection.get("n") if random_proj else None,
        "trial": projection.get("trial") if random_proj else None,
        "combine": (att.get("combine") or projection.get("combine") or "sum")
        if projection is not None else None,
        "temperature": att.get("temperature"),
        "window": att.get("window"),
        "layer": att.get("layer"),
        "sigma": att.get("sigma"),
        "postprocess": (config.get("postprocess") or {}).get("name", "none"),
        "short_side": config["preprocess"]["short_side"],
        "crop": config["preprocess"]["window"],
        "stride": config["preprocess"]["stride"],
        "precision": info.get("precision", config.get("precision")),
        "num_images": num_images,
        "limit": config.get("limit"),
        **{k: None if metrics.get(k) is None else float(metrics[k])
           for k in ("mIoU", "aAcc", "mAcc")},
    }


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        return netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str = "auto") -> str:
    """auto -> online if logged in else offline; ``WANDB_MODE`` in the environment wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.mode={requested!r} is not one of auto|online|offline|disabled")
    if requested == "auto":
        return "online" if wandb_logged_in() else "offline"
    if requested == "online" and not wandb_logged_in():
        raise ValueError("logger.mode=online but W&B has no credentials: run `wandb login` "
                         "or use logger.mode=offline")
    return requested


def git_commit() -> str | None:
    """``<sha>`` of the checkout this package runs from, ``+dirty`` with local changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Library versions, python, platform and git commit for the record."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": git_commit()}


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON via a temporary file + rename, so a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=_jsonable)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


class Tracker:
    """One W&B run per evaluation (or nothing for ``logger=none``).

    Args:
        settings: the ``logger`` config section as a plain dict.
        run_dir: the evaluation's output directory (W&B files go under it).
    """

    def __init__(self, settings: Mapping[str, Any], run_dir: Path):
        self.settings = dict(settings)
        self.run_dir = run_dir
        self.run = None

    @property
    def enabled(self) -> bool:
        return self.settings.get("name", "none") == "wandb"

    def start(self, config: Mapping[str, Any], name: str, group: str | None = None,
              tags: Sequence[str] = ()) -> None:
        if not self.enabled:
            return
        import wandb

        mode = wandb_mode(self.settings.get("mode", "auto"))
        self.run = wandb.init(
            project=self.settings.get("project", "sclip_lab"),
            entity=self.settings.get("entity"),
            group=group or self.settings.get("group"),
            tags=list(tags) + list(self.settings.get("tags") or []),
            name=name, config=dict(config), mode=mode, dir=str(self.run_dir),
            reinit="finish_previous", settings=wandb.Settings(silent=True, console="off"),
        )
        log.info("W&B run %s (%s)", self.run.id, mode)

    def log_result(self, summary: Mapping[str, Any], per_class: Mapping[str, float],
                   overlays: Sequence[tuple[str, np.ndarray]] = ()) -> None:
        """The record's summary row (``summary_of``: metrics and the fields tables match on)
        into the run summary, per-class IoU as a table, overlays as images."""
        if self.run is None:
            return
        import wandb

        self.run.summary.update(dict(summary))
        table = wandb.Table(columns=["class", "IoU"],
                            data=[[k, None if v is None else float(v)]
                                  for k, v in per_class.items()])
        payload: dict[str, Any] = {"per_class_iou": table}
        if overlays:
            payload["predictions"] = [wandb.Image(img, caption=cap) for cap, img in overlays]
        self.run.log(payload)

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
