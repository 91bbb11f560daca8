"""Where results go: a local ``result.json`` always, a W&B run unless ``logger=none``.

W&B never prompts: the mode is decided before ``wandb.init`` (online only when the user
is logged in, i.e. ``WANDB_API_KEY`` or a netrc entry exists; ``WANDB_MODE`` wins).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
INIT_TIMEOUT_S = 30.0  # longest wait for wandb.init (a key but no network: ~100 s)
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


WANDB_MODES = ("auto", "online", "offline", "disabled")


def check_logger(settings: Mapping[str, Any]) -> None:
    """Refuse an impossible ``logger`` section before any work (ConfigError)."""
    from sclip_lab.errors import ConfigError, number

    name = settings.get("name", "none")
    if name not in ("wandb", "none"):
        raise ConfigError(f"logger={name!r} is not one of wandb|none")
    if name == "wandb":
        if settings.get("mode", "auto") not in WANDB_MODES:
            raise ConfigError(f"logger.mode={settings.get('mode')!r} is not one of "
                              f"{'|'.join(WANDB_MODES)}")
        number(settings.get("init_timeout", INIT_TIMEOUT_S), "logger.init_timeout", above=0)


def wandb_mode(requested: str = "auto") -> str:
    """auto -> online if logged in else offline; ``WANDB_MODE`` in the environment wins.

    ``online`` without credentials falls back to offline with a warning: the run is kept
    on disk for a later ``wandb sync`` instead of failing after the evaluation.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested == "auto":
        return "online" if wandb_logged_in() else "offline"
    if requested == "online" and not wandb_logged_in():
        log.warning("logger.mode=online but W&B has no credentials: logging offline (run "
                    "`wandb login`, then `python -m sclip_lab.sync` to upload)")
        return "offline"
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
    if isinstance(obj, np.ndarray | np.generic) or hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _jsonable(obj: Any) -> Any:
    return str(obj)


class Tracker:
    """One W&B run per evaluation (or nothing for ``logger=none``).

    W&B is second to the local record: every failure (no key, no network, quota, auth, a
    W&B bug) becomes one warning line and switches the tracker off; nothing here raises.
    ``wandb.init`` waits at most ``logger.init_timeout`` seconds (default 30); an online
    run that cannot start is retried once offline, so that ``python -m sclip_lab.sync``
    can upload it later.

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

    def _warn(self, what: str, error: BaseException, then: str = "W&B logging is off for "
              "this run; the local record is unaffected") -> None:
        from sclip_lab.errors import message_of

        log.warning("W&B: %s failed (%s: %s); %s", what, type(error).__name__,
                    message_of(error)[:200], then)

    def start(self, config: Mapping[str, Any], name: str, group: str | None = None,
              tags: Sequence[str] = ()) -> None:
        if not self.enabled:
            return
        try:
            import wandb

            mode = wandb_mode(self.settings.get("mode", "auto"))
            timeout = float(self.settings.get("init_timeout", INIT_TIMEOUT_S))
            kwargs = dict(
                project=self.settings.get("project", "sclip_lab"),
                entity=self.settings.get("entity"),
                group=group or self.settings.get("group"),
                tags=list(tags) + list(self.settings.get("tags") or []),
                name=name, config=dict(config), dir=str(self.run_dir),
                reinit="finish_previous")
            settings = dict(silent=True, console="off", init_timeout=timeout)
            try:
                self.run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
            except Exception as e:  # noqa: BLE001 - online trouble: keep the run offline
                if mode != "online":
                    raise
                self._warn("starting an online run", e, "logging offline instead (upload "
                           "later with python -m sclip_lab.sync)")
                mode = "offline"
                self.run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
            log.info("W&B run %s (%s)", self.run.id, mode)
        except Exception as e:  # noqa: BLE001 - logging must never cost a result
            self._warn("starting the run", e)
            self.run = None

    def log_result(self, summary: Mapping[str, Any], per_class: Mapping[str, float],
                   overlays: Sequence[tuple[str, np.ndarray]] = ()) -> None:
        """The record's summary row (``summary_of``: metrics and the fields tables match on)
        into the run summary, per-class IoU as a table, overlays as images."""
        if self.run is None:
            return
        try:
            import wandb

            self.run.summary.update(dict(summary))
            table = wandb.Table(columns=["class", "IoU"],
                                data=[[k, None if v is None else float(v)]
                                      for k, v in per_class.items()])
            payload: dict[str, Any] = {"per_class_iou": table}
            if overlays:
                payload["predictions"] = [wandb.Image(img, caption=cap) for cap, img in overlays]
            self.run.log(payload)
        except Exception as e:  # noqa: BLE001
            self._warn("logging the result", e)

    def log(self, payload: Mapping[str, Any]) -> None:
        """Log a step's values (e.g. a training loss); failures are one warning."""
        if self.run is None:
            return
        try:
            self.run.log(dict(payload))
        except Exception as e:  # noqa: BLE001
            self._warn("logging", e)
            self.run = None

    def finish(self, ok: bool) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=0 if ok else 1)
        except Exception as e:  # noqa: BLE001
            self._warn("finishing the run", e)
