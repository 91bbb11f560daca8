"""Evaluate configurations on a benchmark: ``python -m sclip_lab.run [overrides]``.

compose (Hydra) -> build data, segmenter, metrics, trackers -> evaluate -> records.

``variants=[...]`` evaluates several last-block variants (attention, projection, their
knobs, post-processing) in one data pass: blocks 1…depth−1 run once per window, then
every variant's head. Each variant gets its own ``result.json`` and W&B run. A record is
written only when its evaluation finished; with ``resume_root`` set, variants whose
finished record (same result key) already exists there are skipped.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sclip_lab import data, segment, viz
from sclip_lab.config import result_key
from sclip_lab.errors import (
    ConfigError,
    UserError,
    check_writable_dir,
    clear_failed,
    hydra_entry,
    integer,
    mark_failed,
    message_of,
)
from sclip_lab.metrics import SegmentationMetrics
from sclip_lab.model import resolve_device, resolve_precision
from sclip_lab.pipeline import Segmenter, build_head, build_segmenter
from sclip_lab.tracking import (
    RESULT_FILE,
    Tracker,
    check_logger,
    environment,
    summary_of,
    write_json_atomic,
)

log = logging.getLogger("sclip_lab")

# What a variant may change: everything after the shared trunk.
VARIANT_KEYS = ("attention", "projection", "postprocess")
SHARED_KEYS = ("model", "dataset", "preprocess", "text", "precision", "limit", "data_root")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _as_list(batch: list) -> list:
    return batch


def slug(overrides: str) -> str:
    """A directory name for a variant's override string."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", overrides).strip("-") or "default"


# ------------------------------------------------------------------------------ records


def finished_records(root: str | Path | None) -> dict[str, Path]:
    """result key -> record path, for every finished ``result.json`` under ``root``."""
    found: dict[str, Path] = {}
    if not root:
        return found
    if Path(root).exists() and not Path(root).is_dir():
        raise ConfigError(f"resume_root={root} is a file; point it at a sweep directory")
    if not Path(root).is_dir():
        return found
    for path in Path(root).rglob(RESULT_FILE):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("status") == "finished" and rec.get("key"):
            found[rec["key"]] = path
    return found


# ----------------------------------------------------------------------------- variants


@dataclass
class Job:
    """One variant to evaluate: its composed config, output dir and accumulators."""

    cfg: DictConfig
    run_dir: Path
    label: str
    key: str = ""
    metric: SegmentationMetrics | None = None
    overlays: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0


def variant_overrides(entry: str) -> list[str]:
    """``"local window=5"`` or ``"attention=local window=5"`` -> Hydra overrides."""
    tokens = shlex.split(str(entry))
    if not tokens:
        raise ConfigError("a variant entry is empty; write e.g. 'attention=local window=5'")
    if "=" not in tokens[0]:
        tokens[0] = f"attention={tokens[0]}"
    return tokens


def variant_configs(cfg: DictConfig, entries: Sequence[str] | None = None, compose=None
                    ) -> list[tuple[str, DictConfig]]:
    """``[(label, config)]``: the job's own config, or one per variant entry.

    Each entry (default: ``cfg.variants``) is a string of overrides, ``"attention=local
    window=5"`` (or ``"local window=5"``), composed on top of this job's overrides; variants
    may change only attention, projection, their knobs and post-processing (what comes
    after the shared trunk). ``compose(overrides) -> config`` defaults to Hydra's.
    """
    entries = cfg.get("variants") if entries is None else entries
    if not entries:
        return [("", cfg)]
    if compose is None:
        from hydra import compose as hydra_compose

        job = HydraConfig.get()
        base = [o for o in job.overrides.task if not o.startswith(("variants=", "+variants="))]
        compose = partial(_compose_variant, hydra_compose, job.job.config_name, base)
    out = []
    for entry in entries:
        try:
            vcfg = compose(variant_overrides(entry))
        except Exception as e:  # Hydra's own errors name the unknown group or option
            raise ConfigError(f"variant '{entry}': {str(e).splitlines()[0]}") from None
        for key in SHARED_KEYS:
            if OmegaConf.select(vcfg, key) != OmegaConf.select(cfg, key):
                raise ConfigError(f"variant '{entry}' changes {key}; variants may only change "
                                  f"{', '.join(VARIANT_KEYS)} and their knobs — sweep {key} "
                                  "as separate jobs")
        out.append((str(entry), vcfg))
    return out


def _compose_variant(hydra_compose, config_name: str, base: list[str], overrides: list[str]):
    cfg = hydra_compose(config_name=config_name, overrides=base + overrides)
    with open_dict(cfg):
        cfg.variants = None
    return cfg


# ---------------------------------------------------------------------------- evaluation


def segmenter_from_config(cfg: DictConfig, classes, logit_scale: float, prob_thd: float,
                          area_thd: float | None) -> tuple[Segmenter, dict]:
    """``build_segmenter`` with the sections of a composed run/predict config."""
    return build_segmenter(
        model=cfg.model, attention=cfg.attention, projection=cfg.get("projection"),
        preprocess=cfg.preprocess, postprocess=cfg.get("postprocess"), classes=list(classes),
        logit_scale=logit_scale, prob_thd=prob_thd, area_thd=area_thd,
        templates=cfg.text.templates, device=cfg.device, precision=cfg.precision,
        batch_size=cfg.batch_size, cache_dir=cfg.cache_dir, learned=learned_of(cfg))


def learned_of(cfg: DictConfig):
    if cfg.get("projection") is None or cfg.projection.name != "learned":
        return None
    from sclip_lab.learn import learned_projection

    return learned_projection(cfg)


def preflight(cfg: DictConfig) -> None:
    """The cheap checks of a run config, before data, model or text are touched: numbers
    and their ranges, the logger, and the directories the run will write."""
    integer(cfg.seed, "seed")
    integer(cfg.limit, "limit", 1, optional=True)
    for key, low in (("images_per_batch", 1), ("num_workers", 0), ("save_overlays", 0),
                     ("batch_size", 1)):
        integer(cfg[key], key, low)
    integer(cfg.get("num_threads"), "num_threads", 1, optional=True)
    check_logger(cfg.logger)
    integer(cfg.logger.get("num_overlays", 0) or 0, "logger.num_overlays", 0)
    if cfg.get("cache_dir"):
        check_writable_dir(cfg.cache_dir, "cache_dir")


def evaluate(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Evaluate every job in one data pass; write and return their records."""
    t0 = time.perf_counter()
    base = jobs[0].cfg
    preflight(base)
    seed_everything(int(base.seed))
    if base.get("num_threads") is not None:
        torch.set_num_threads(int(base.num_threads))
    spec = data.spec_from_config(base.dataset)
    root = data.resolve_data_root(base.data_root)
    if base.dataset.get("source", "files") == "files":
        from sclip_lab.prepare import ensure_ready

        ensure_ready(spec, root, auto_prepare=bool(base.auto_prepare))
    transform = partial(segment.preprocess, short_side=int(base.preprocess.short_side))
    dataset = data.build_dataset(base.dataset, root, base.limit, transform)
    segmenter, info = segmenter_from_config(base, spec.classes, spec.logit_scale,
                                            spec.prob_thd, spec.area_thd)
    jobs = [jobs[0]] + add_heads(segmenter, jobs[1:])
    for job in jobs:
        job.metric = SegmentationMetrics(spec.num_classes).to(segmenter.device)
    t_setup = time.perf_counter() - t0
    names = ", ".join(j.label or j.cfg.attention.name for j in jobs)
    log.info("%s: %d images, %d variant(s) [%s], %s %s (%s) on %s", spec.name, len(dataset),
             len(jobs), names, info["arch"], info["pretrained"], info["precision"],
             info["device"])

    keep = max(int(base.save_overlays), int(base.logger.get("num_overlays", 0) or 0))
    loader = DataLoader(dataset, batch_size=int(base.images_per_batch), collate_fn=_as_list,
                        num_workers=int(base.num_workers), shuffle=False)
    t1 = time.perf_counter()
    with tqdm(total=len(dataset), desc=spec.name, unit="img", dynamic_ncols=True) as bar:
        for items in worker_errors_unwrapped(loader):
            labels = [torch.from_numpy(it["label"]).to(segmenter.device) for it in items]
            per_head = segmenter.iter_heads([it["input"] for it in items],
                                            [tuple(lb.shape) for lb in labels])
            for job, head_logits in zip(jobs, per_head):
                for it, label, logits in zip(items, labels, head_logits):
                    pred = segment.predict_classes(logits, segmenter.post)
                    job.metric.update(pred, label)
                    if len(job.overlays) < keep:
                        job.overlays.append((it["id"], it["image"], pred.cpu().numpy()))
            bar.update(len(items))
    t_eval = time.perf_counter() - t1
    return [finish_job(job, spec, info, len(dataset),
                       {"setup_s": t_setup, "eval_s": t_eval, "variants_in_pass": len(jobs),
                        "per_image_s": t_eval / max(len(dataset), 1)}) for job in jobs]


def worker_errors_unwrapped(loader: DataLoader):
    """Iterate ``loader``; a DataLoader worker's user error (a corrupt image, a label of
    the wrong size) comes back as its own one-line error, not torch's wrapper."""
    it = iter(loader)
    while True:
        try:
            items = next(it)
        except StopIteration:
            return
        except UserError as e:
            raise type(e)(message_of(e)) from None
        yield items


def add_heads(segmenter: Segmenter, jobs: Sequence[Job]) -> list[Job]:
    """Give ``segmenter`` a head per job; a variant that cannot be built (e.g. a learned
    projection without training data) is marked failed and the others go on."""
    kept = []
    for job in jobs:
        try:
            head = build_head(job.cfg.attention, job.cfg.get("projection"),
                              job.cfg.get("postprocess"), segmenter.encoder, learned_of(job.cfg))
        except UserError as e:
            log.error("variant [%s] skipped: %s", job.label, e)
            mark_failed(job.run_dir, e)
            continue
        segmenter.heads.append(head)
        kept.append(job)
    return kept


def finish_job(job: Job, spec: data.BenchmarkSpec, info: Mapping[str, Any], num_images: int,
               timings: Mapping[str, float]) -> dict[str, Any]:
    """Compute a job's metrics, log them, save overlays, write its record and W&B run."""
    config = OmegaConf.to_container(job.cfg, resolve=True)
    scores = job.metric.compute()
    per_class = {name: (None if torch.isnan(v) else round(float(v), 4))
                 for name, v in zip(spec.classes, scores["per_class_iou"])}
    metrics = {k: float(scores[k]) for k in ("mIoU", "aAcc", "mAcc")}
    label = job.label or job.cfg.attention.name
    log.info("%s [%s]: mIoU %.2f  aAcc %.2f  mAcc %.2f", spec.name, label, metrics["mIoU"],
             metrics["aAcc"], metrics["mAcc"])
    job.run_dir.mkdir(parents=True, exist_ok=True)
    names = viz.class_names(spec.classes, has_background=spec.prob_thd > 0)
    for i, (img_id, image, pred) in enumerate(job.overlays[:int(job.cfg.save_overlays)]):
        viz.segmentation_figure(image, {label: pred}, names,
                                job.run_dir / f"overlay_{i:03d}_{Path(img_id).name}")
    summary = summary_of(config, metrics, info, num_images)
    record = {
        "status": "finished",
        "key": job.key,
        "summary": summary,
        "sweep": config.get("sweep"),
        "variant": job.label or None,
        "metrics": metrics,
        "per_class_iou": per_class,
        "num_images": num_images,
        "model": dict(info),
        "timings": dict(timings),
        "config": config,
        **environment(),
    }
    # The record first: nothing that happens to the logging afterwards can lose it.
    write_json_atomic(job.run_dir / RESULT_FILE, record)
    clear_failed(job.run_dir)
    print(f"mIoU {metrics['mIoU']:.2f}  {spec.name} [{label}] ({num_images} images) -> "
          f"{job.run_dir / RESULT_FILE}")
    tracker = Tracker(config["logger"], job.run_dir)
    sweep = config.get("sweep") or {}
    tracker.start(config, name=f"{job.cfg.name}{'-' + slug(job.label) if job.label else ''}",
                  group=sweep.get("group"),
                  tags=[t for t in (spec.name, job.cfg.attention.name, sweep.get("table"))
                        if t])
    n_log = int(job.cfg.logger.get("num_overlays", 0) or 0)
    tracker.log_result(summary, per_class, [(img_id, viz.overlay(image, pred))
                                            for img_id, image, pred in job.overlays[:n_log]])
    tracker.finish(True)
    return record


def plan_jobs(cfg: DictConfig, run_dir: Path, compose=None) -> list[Job]:
    """The variants of this job that still need evaluating (resume skips finished ones)."""
    jobs = []
    done = finished_records(cfg.get("resume_root"))
    for label, vcfg in variant_configs(cfg, compose=compose):
        job = Job(vcfg, run_dir / slug(label) if label else run_dir, label)
        precision = resolve_precision(vcfg.precision, resolve_device(vcfg.device))
        job.key = result_key({**OmegaConf.to_container(vcfg, resolve=True),
                              "precision": precision})
        if job.key in done:
            log.info("skip [%s]: finished record %s", label or vcfg.attention.name,
                     done[job.key])
            continue
        jobs.append(job)
    return jobs


@hydra_entry("run")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    jobs = plan_jobs(cfg, run_dir)
    if not jobs:
        clear_failed(run_dir)
        print(f"nothing to do: every variant has a finished record under {cfg.resume_root}")
        return None
    records = evaluate(jobs)
    clear_failed(run_dir)
    return records[0]["metrics"]["mIoU"] if records else None


if __name__ == "__main__":
    # Call the importable sclip_lab.run.main, not __main__'s copy: launchers (submitit)
    # pickle the task function, which works by reference only for an importable module.
    from sclip_lab.run import main as entry

    entry()
