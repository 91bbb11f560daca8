"""The record of an evaluation: ``result.json``, its summary row, its key, reading it back.

One record per finished evaluation (and per variant of a shared-trunk pass), written
atomically when its metric is computed. Resume (``run``) and tables (``make_tables``) read
records only through this module. A job or variant that failed leaves ``failed.json``
where its record would have gone instead.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import traceback
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from sclip_lab.attention import ATTENTIONS
from sclip_lab.errors import ConfigError, message_of
from sclip_lab.files import atomic_target, write_json_atomic
from sclip_lab.head_spec import HeadSpec, head_spec_of

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
FINISHED = "finished"
METRICS = ("mIoU", "aAcc", "mAcc")
PACKAGES = ("torch", "torchvision", "open_clip_torch", "torchmetrics", "hydra-core", "wandb",
            "numpy", "opencv-python-headless", "sclip_lab")
# The parts of a resolved config that determine a run's numbers (top-level knobs such as
# n or window reach them by interpolation); speed, paths and logging are left out.
# Dataset keys added after the first records: absent from their keys while at these values.
VOCABULARY_DEFAULTS = {"synonyms": True, "background_word": None, "class_overrides": {}}
TEXT_DEFAULTS = {"scores": "softmax"}  # text keys added later, likewise
RESULT_KEYS = ("model", "dataset", "attention", "projection", "preprocess", "postprocess",
               "text", "precision", "limit")


def result_key(config: Mapping[str, Any], spec: HeadSpec | None = None) -> str:
    """Hash of the result-relevant part of a resolved config (the sweep resume key); its
    head parts come from the head's validated ``spec`` (``HeadSpec.key_sections``: default
    that of ``config``)."""
    relevant = {k: config.get(k) for k in RESULT_KEYS}
    if isinstance(relevant["dataset"], Mapping):  # where archives come from changes no number
        relevant["dataset"] = {k: v for k, v in relevant["dataset"].items() if k != "prepare"
                               and not (k in VOCABULARY_DEFAULTS
                                        and v == VOCABULARY_DEFAULTS[k])}
    if isinstance(relevant["text"], Mapping):
        relevant["text"] = {k: v for k, v in relevant["text"].items()
                            if not (k in TEXT_DEFAULTS and v == TEXT_DEFAULTS[k])}
    att = relevant["attention"]
    if spec is None and isinstance(att, Mapping) and att.get("name") in ATTENTIONS:
        spec = head_spec_of(config, require_proxy=False)
    if spec is not None:  # a proxy section only for proxy variants: the others keep keys
        relevant.update(spec.key_sections())
    if lossy_trunk_cache(config):  # only then: the exact cache leaves old keys as they were
        relevant["trunk_cache_dtype"] = config["trunk_cache_dtype"]
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lossy_trunk_cache(config: Mapping[str, Any]) -> bool:
    """True when a run reads its trunk from a cache that rounded it: ``trunk_cache`` set
    with ``trunk_cache_dtype=fp16`` on an fp32 trunk (``precision`` resolved)."""
    return bool(config.get("trunk_cache")) and config.get("trunk_cache_dtype") == "fp16" \
        and config.get("precision") == "fp32"


def reads_proxy(attention: str) -> bool:
    """Whether attention variant ``attention`` reads a proxy backbone (ProxyCLIP)."""
    return attention in ATTENTIONS and ATTENTIONS[attention].proxy


def summary_of(config: Mapping[str, Any], metrics: Mapping[str, Any],
               info: Mapping[str, Any] | None = None, num_images: int | None = None,
               spec: HeadSpec | None = None) -> dict[str, Any]:
    """The flat row that sweeps and tables read (one per record, also the W&B summary).

    Args:
        config: a resolved run config.
        metrics: ``mIoU``, ``aAcc``, ``mAcc``.
        info: what loading resolved (``arch``, ``precision``); default: the config's.
        num_images: images evaluated.
        spec: the head's validated spec (``HeadSpec.summary``: the head's fields); default
            that of ``config``.
    """
    info = info or {}
    spec = spec or head_spec_of(config, require_proxy=False)
    return {
        "dataset": config["dataset"]["name"],
        "model": info.get("arch", config["model"]["arch"]),
        "pretrained": str(config["model"]["pretrained"]),
        **spec.summary(),
        "protocol": (config.get("protocol") or {}).get("name", "sclip"),
        "short_side": config["preprocess"]["short_side"],
        "crop": config["preprocess"]["window"],
        "stride": config["preprocess"]["stride"],
        "precision": info.get("precision", config.get("precision")),
        "num_images": num_images,
        "limit": config.get("limit"),
        **{k: None if metrics.get(k) is None else float(metrics[k]) for k in METRICS},
    }


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


@functools.cache
def _environment() -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": git_commit()}


def environment() -> dict[str, Any]:
    """Library versions, python, platform and git commit for the record (read once per
    process: a pass over 20 variants writes 20 records)."""
    return copy.deepcopy(_environment())


# The scheduler's ids of the job that computed a record (its environment; never in the key).
SLURM_IDS = (("slurm_job_id", "SLURM_JOB_ID"), ("slurm_array_job_id", "SLURM_ARRAY_JOB_ID"),
             ("slurm_array_task_id", "SLURM_ARRAY_TASK_ID"), ("slurm_partition",
             "SLURM_JOB_PARTITION"), ("slurm_cluster", "SLURM_CLUSTER_NAME"))


def job_identity() -> dict[str, Any]:
    """Which job computed a record: the host; under SLURM its job id, array job and task
    ids, partition, cluster and restart count (requeues); under a submitit launcher its
    job id (``<array job>_<task>`` on SLURM). Identity only: no part of the result key."""
    job: dict[str, Any] = {"host": platform.node()}
    job.update({key: os.environ[var] for key, var in SLURM_IDS if os.environ.get(var)})
    if "slurm_job_id" in job:
        job["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if os.environ.get("SUBMITIT_EXECUTOR"):
        try:
            import submitit

            job["submitit_job_id"] = str(submitit.JobEnvironment().job_id)
        except Exception:  # noqa: BLE001 - identity is best effort, never a lost record
            pass
    return job


def build_record(config: Mapping[str, Any], key: str, metrics: Mapping[str, float],
                 per_class: Mapping[str, float | None], info: Mapping[str, Any],
                 num_images: int, timings: Mapping[str, float], variant: str | None = None,
                 classes: Sequence[str] | None = None, spec: HeadSpec | None = None,
                 per_class_acc: Mapping[str, float | None] | None = None
                 ) -> dict[str, Any]:
    """A finished evaluation's record (``config`` resolved, metrics in %): ``per_class``
    (IoU) and ``per_class_acc`` (mmseg's per-class Acc; None when not given) keyed by each
    class's display name, ``classes`` its full query lines (synonyms)."""
    return {
        "status": FINISHED,
        "key": key,
        "summary": summary_of(config, metrics, info, num_images, spec),
        "sweep": config.get("sweep"),
        "job": job_identity(),
        "variant": variant or None,
        "metrics": dict(metrics),
        "per_class_iou": dict(per_class),
        "per_class_acc": None if per_class_acc is None else dict(per_class_acc),
        "classes": None if classes is None else list(classes),
        "num_images": num_images,
        "model": dict(info),
        "timings": dict(timings),
        "config": dict(config),
        **environment(),
    }


def write_record(run_dir: Path, record: Mapping[str, Any]) -> Path:
    """``run_dir/result.json``, atomically; a failed.json of an earlier attempt goes."""
    path = Path(run_dir) / RESULT_FILE
    write_json_atomic(path, record)
    clear_failed(run_dir)
    return path


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Leave ``failed.json`` (error and traceback) where a record would have gone."""
    try:
        write_json_atomic(Path(run_dir) / FAILED_FILE, {
            "status": "failed", "error": f"{type(error).__name__}: {message_of(error)}",
            "traceback": traceback.format_exc()})
    except OSError as e:  # the failure itself is already on the console
        log.warning("could not write %s in %s (%s)", FAILED_FILE, run_dir, e)


def clear_failed(run_dir: Path) -> None:
    """A job or variant that now succeeded drops the failed.json of an earlier attempt."""
    (Path(run_dir) / FAILED_FILE).unlink(missing_ok=True)


def failed_jobs(root: Path) -> list[tuple[Path, str]]:
    """``[(failed.json path, its error line)]`` under ``root``."""
    out = []
    for path in sorted(Path(root).rglob(FAILED_FILE)):
        try:
            error = json.loads(path.read_text()).get("error", "?")
        except (OSError, ValueError):
            error = "unreadable failed.json"
        out.append((path, str(error)))
    return out


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` if it is a finished one; None for anything else.

    Raises:
        OSError, ValueError: the file cannot be read or is not JSON.
    """
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, Mapping) or payload.get("status") != FINISHED:
        return None
    return dict(payload)


def iter_records(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(path, record)`` of every finished record under ``root`` (any depth, path order);
    unreadable files are skipped with a warning."""
    for path in sorted(Path(root).rglob(RESULT_FILE)):
        try:
            record = read_record(path)
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable %s: %s", path, e)
            continue
        if record is not None:
            yield path, record


def finished_records(root: str | Path | None) -> dict[str, Path]:
    """result key -> record path, for every finished record under ``root`` (resume)."""
    if not root:
        return {}
    if Path(root).exists() and not Path(root).is_dir():
        raise ConfigError(f"resume_root={root} is a file; point it at a sweep directory")
    if not Path(root).is_dir():
        return {}
    found = {}
    for path, record in iter_records(root):
        if record.get("key"):
            found[record["key"]] = path
    return found


def summary_row(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The summary row of a record (or of a W&B run's summary + config), normalised:
    derived from the config when an older record has none; None without dataset/mIoU."""
    summary = record.get("summary")
    if not isinstance(summary, Mapping) or "dataset" not in summary:
        config = record.get("config")
        if not isinstance(config, Mapping):
            return None
        try:
            summary = summary_of(config, record.get("metrics") or summary or {})
        except (KeyError, TypeError, ConfigError):  # not a run config, or a removed variant
            return None
    if summary.get("mIoU") is None or summary.get("dataset") is None:
        return None
    return dict(summary)


PER_CLASS_FILE = "per_class_iou.csv"


def write_per_class_csv(path: Path, per_class: Mapping[str, float | None],
                        classes: Sequence[str],
                        per_class_acc: Mapping[str, float | None] | None = None) -> None:
    """``class,iou,acc,queries`` per class (empty IoU for a class absent from the split,
    empty Acc for one absent from its labels or when ``per_class_acc`` is not given)."""
    import pandas as pd  # only where a table is written: records is read by light commands

    acc = per_class_acc or {}
    frame = pd.DataFrame({"class": list(per_class), "iou": list(per_class.values()),
                          "acc": [acc.get(name) for name in per_class],
                          "queries": list(classes)})
    with atomic_target(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4f")


def unique_names(names: Sequence[str]) -> list[str]:
    """Display names made unique for record keys: a repeated name gets ``#index``."""
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
