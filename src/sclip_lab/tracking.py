"""The W&B side of a run (``logger=wandb``); the local record is ``records``' job.

W&B never prompts: the mode is decided before ``wandb.init`` (online only when the user
is logged in, i.e. ``WANDB_API_KEY`` or a netrc entry exists; ``WANDB_MODE`` wins).
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 30.0  # longest wait for wandb.init (a key but no network: ~100 s)


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

            from sclip_lab.records import job_identity

            mode = wandb_mode(self.settings.get("mode", "auto"))
            timeout = float(self.settings.get("init_timeout", INIT_TIMEOUT_S))
            kwargs = dict(
                project=self.settings.get("project", "sclip_lab"),
                entity=self.settings.get("entity"),
                group=group or self.settings.get("group"),
                tags=list(tags) + list(self.settings.get("tags") or []),
                # the job that ran it (SLURM job/array ids), as in the record
                name=name, config={**dict(config), "job": job_identity()}, dir=str(self.run_dir),
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
            if mode == "offline":
                log.info("W&B run %s offline under %s (upload later: python -m sclip_lab.sync "
                         "%s)", self.run.id, self.run_dir / "wandb", self.run_dir)
            else:
                log.info("W&B run %s: %s", self.run.id, self.run.url)
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
            # One key per overlay: W&B warns about (and misdraws) a list of differently
            # sized images, and benchmark images differ in size.
            for i, (cap, img) in enumerate(overlays):
                payload[f"predictions/{i:03d}"] = wandb.Image(img, caption=cap)
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
