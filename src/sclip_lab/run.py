"""Evaluate configurations on a benchmark: ``python -m sclip_lab.run [overrides]``.

compose (Hydra) -> build data, segmenter, metrics, trackers -> evaluate -> records.

``variants=[...]`` evaluates several last-block variants (attention, projection, their
knobs, post-processing) in one data pass: blocks 1…depth−1 run once per window, then
every variant's head. Each variant gets its own ``result.json`` and W&B run. A record is
written only when its evaluation finished; with ``resume_root`` set, variants whose
finished record (same result key) already exists there are skipped.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sclip_lab import data, viz
from sclip_lab.build import learned_of, segmenter_from_config, slug, variant_configs
from sclip_lab.cli import hydra_entry
from sclip_lab.config import unused_knobs, variant_label
from sclip_lab.console import banner, per_class_table, proxy_text, weights_text
from sclip_lab.errors import (
    ConfigError,
    PartialFailure,
    UserError,
    check_writable_dir,
    clip,
    integer,
    message_of,
    plural,
)
from sclip_lab.evaluation import class_scores, evaluate_segmenter, rounded
from sclip_lab.head_spec import HeadSpec, head_spec_of
from sclip_lab.metrics import SegmentationMetrics
from sclip_lab.model import resolve_device, resolve_precision
from sclip_lab.pipeline import Preprocess, Segmenter
from sclip_lab.proxy import proxy_identity
from sclip_lab.records import (
    PER_CLASS_FILE,
    build_record,
    clear_failed,
    finished_records,
    mark_failed,
    result_key,
    write_per_class_csv,
    write_record,
)
from sclip_lab.tracking import Tracker, check_logger
from sclip_lab.trunk_cache import check_cache_dir, check_dtype

log = logging.getLogger("sclip_lab")

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- variants


@dataclass
class Job:
    """One variant to evaluate: its composed config, output dir and accumulators.

    ``entry`` is the ``variants=`` entry that made it ("" for the job's own config),
    ``label`` its full name for the console (``variant_label``)."""

    cfg: DictConfig
    run_dir: Path
    entry: str
    label: str = ""
    key: str = ""
    metric: SegmentationMetrics | None = None
    overlays: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0
    proxy: dict[str, Any] | None = None  # its proxy backbone's identity (attention=proxy)
    error: UserError | None = None  # why this variant cannot be evaluated (failed.json)
    spec: HeadSpec | None = None  # its validated head
    learned: Any = None  # its learned projection's (W, b) (projection=learned)


# ---------------------------------------------------------------------------- evaluation


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json")


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
    check_dtype(cfg.get("trunk_cache_dtype", "fp32"))
    if cfg.get("trunk_cache"):
        check_cache_dir(cfg.trunk_cache)  # writable, and empty or a trunk cache already
    for key in ("pretrained", "config_file"):  # a file that is not there fails now, not later
        value = str(cfg.model.get(key) or "")
        path = Path(value).expanduser()
        if Path(value).suffix in WEIGHT_SUFFIXES and not path.is_file():
            raise ConfigError(f"model.{key}={value} does not exist; point it at a file"
                              + (" or a hub tag such as 'openai'" if key == "pretrained" else ""))


def refuse_broken(jobs: Sequence[Job]) -> list[Job]:
    """The jobs that can be evaluated; each broken one is logged and gets its failed.json.
    A lone job's own config (no ``variants=``) that is broken is the run's error."""
    if len(jobs) == 1 and jobs[0].error is not None and not jobs[0].entry:
        raise jobs[0].error
    for job in jobs:
        if job.error is not None:
            log.error("variant [%s] refused: %s", job.label, message_of(job.error))
            mark_failed(job.run_dir, job.error)
    good = [job for job in jobs if job.error is None]
    if not good:
        raise ConfigError(f"every variant is broken ({failed_list(jobs)}); fix the entries "
                          "of variants=")
    return good


def failed_list(jobs: Sequence[Job]) -> str:
    """``[label] why, …`` of the failed jobs, for one line."""
    return ", ".join(f"[{j.label}] {clip(message_of(j.error), 140)}" for j in jobs if j.error)


def evaluate(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Evaluate every job that can be in one data pass; write and return their records.
    Broken jobs (``job.error``, set by ``plan_jobs`` or here) get a failed.json instead."""
    t0 = time.perf_counter()
    jobs = refuse_broken(jobs)
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
    prep = Preprocess.from_section(base.preprocess)
    dataset = data.build_dataset(base.dataset, root, base.limit, prep)
    jobs = with_learned(jobs)  # refused ones are out of this list: each is logged once
    segmenter, info = segmenter_from_config(base, spec.classes, spec.logit_scale,
                                            spec.prob_thd, spec.area_thd, prep,
                                            [(j.spec, j.learned) for j in jobs], keep_going=True)
    for i, error in segmenter.skipped.items():  # a head this model cannot host
        jobs[i].error = error
        mark_failed(jobs[i].run_dir, error)
    jobs = [job for job in jobs if job.error is None]
    for job, head in zip(jobs, segmenter.heads):
        job.proxy = proxy_identity(head.last.proxy, segmenter.proxies.get(head.last.proxy))
    t_setup = time.perf_counter() - t0
    log.info("evaluating\n%s", start_banner(jobs, spec, info, len(dataset), segmenter))

    keep = max(int(base.save_overlays), int(base.logger.get("num_overlays", 0) or 0))
    t1 = time.perf_counter()
    results = evaluate_segmenter(segmenter, dataset, spec.num_classes,
                                 int(base.images_per_batch), int(base.num_workers), keep,
                                 spec.name)
    for job, result in zip(jobs, results):
        job.metric, job.overlays = result.metric, result.overlays
    t_eval = time.perf_counter() - t1
    timings = {"setup_s": t_setup, "eval_s": t_eval, "variants_in_pass": len(jobs),
               "per_image_s": t_eval / max(len(dataset), 1)}
    if segmenter.trunk_cache is not None:
        log.info(segmenter.trunk_cache.summary())
        timings.update(trunk_cache_hits=segmenter.trunk_cache.hits,
                       trunk_cache_misses=segmenter.trunk_cache.misses)
    return [finish_job(job, spec, info, len(dataset), timings) for job in jobs]


def start_banner(jobs: Sequence[Job], spec: data.BenchmarkSpec, info: Mapping[str, Any],
                 num_images: int, segmenter: Segmenter) -> str:
    """What is about to be evaluated, on a few aligned lines."""
    base = jobs[0].cfg
    total = f" (limit={base.limit})" if base.limit is not None else ""
    prep = base.preprocess
    window = ("whole image" if prep.window is None
              else f"{prep.window} windows, stride {prep.stride}")
    back = info["backbone"]
    rows = [("model", f"{info['arch']}  weights {weights_text(info)}"),
            ("tower", f"{back['tower']}, patch {back['patch']}, native {back['native_size']}, "
                      f"{back['text_scores']} scores"),
            ("device", f"{info['device']}, {info['precision']}"),
            ("dataset", f"{spec.name}: {plural(num_images, 'image')}{total}, "
                        f"{plural(spec.num_classes, 'class', 'classes')}, "
                        f"{plural(len(segmenter.queries), 'query', 'queries')}"),
            ("preprocess", f"short side {prep.short_side}, {window}")]
    rows += [("proxy", proxy_text(p)) for p in {str(j.proxy): j.proxy for j in jobs
                                                 if j.proxy}.values()]
    rows += [("variant" if len(jobs) == 1 else f"variant {i + 1}", job.label)
             for i, job in enumerate(jobs)]
    rows.append(("output", str(jobs[0].run_dir if len(jobs) == 1 else jobs[0].run_dir.parent)))
    return banner(rows)


def with_learned(jobs: Sequence[Job]) -> list[Job]:
    """Each job with its learned projection (``projection=learned``: the artefact looked up,
    or trained with ``auto_train``); one that has none is refused, the others go on."""
    for job in jobs:
        try:
            job.learned = learned_of(job.cfg)
        except UserError as e:
            job.error = e
    return refuse_broken(jobs)


def finish_job(job: Job, spec: data.BenchmarkSpec, info: Mapping[str, Any], num_images: int,
               timings: Mapping[str, float]) -> dict[str, Any]:
    """Compute a job's metrics, log them, save overlays, write its record and W&B run."""
    config = OmegaConf.to_container(job.cfg, resolve=True)
    names = viz.class_names(spec.classes, has_background=spec.prob_thd > 0)
    metrics, iou_shown, acc_shown = class_scores(job.metric, names, digits=None)
    per_class, per_class_acc = rounded(iou_shown), rounded(acc_shown)  # the record's
    label = job.label
    log.info("%s [%s]: mIoU %.2f  aAcc %.2f  mAcc %.2f", spec.name, label, metrics["mIoU"],
             metrics["aAcc"], metrics["mAcc"])
    log.info("%s [%s] per-class IoU / Acc (%%), as mmseg prints them:\n%s", spec.name, label,
             per_class_table(iou_shown, acc_shown, metrics))
    if job.proxy is not None:  # the record's model section names both backbones
        info = {**info, "proxy": job.proxy}
    record = build_record(config, job.key, metrics, per_class, info, num_images, timings,
                          job.entry, classes=spec.classes, spec=job.spec,
                          per_class_acc=per_class_acc)
    # The record first: nothing that happens to the files and logging after it can lose it.
    path = save_record(job.run_dir, record)
    print(f"mIoU {metrics['mIoU']:.2f}  {spec.name} [{label}] "
          f"({plural(num_images, 'image')}) -> {path}")
    extras = [(PER_CLASS_FILE, lambda: write_per_class_csv(job.run_dir / PER_CLASS_FILE,
                                                            per_class, spec.classes,
                                                            per_class_acc))]
    extras += [(f"overlay {i}", partial(viz.segmentation_figure, image, {label: pred}, names,
                                        job.run_dir / f"overlay_{i:03d}_{Path(img_id).name}"))
               for i, (img_id, image, pred) in enumerate(job.overlays[:int(job.cfg.save_overlays)])]
    for what, write in extras:
        try:
            write()
        except OSError as e:  # the record holds every number; a figure is not worth a run
            log.warning("could not write %s in %s (%s); the record is complete", what,
                        job.run_dir, e.strerror or e)
            break
    tracker = Tracker(config["logger"], job.run_dir)
    sweep = config.get("sweep") or {}
    tracker.start(config, name=f"{job.cfg.name}{'-' + slug(job.entry) if job.entry else ''}",
                  group=sweep.get("group"),
                  tags=[t for t in (spec.name, job.cfg.attention.name, sweep.get("table"))
                        if t])
    n_log = int(job.cfg.logger.get("num_overlays", 0) or 0)
    tracker.log_result(record["summary"], per_class, [
        (img_id, viz.overlay(image, pred)) for img_id, image, pred in job.overlays[:n_log]])
    tracker.finish(True)
    return record


def save_record(run_dir: Path, record: Mapping[str, Any]) -> Path:
    """``write_record``, with a disk that cannot take it as one user error (the temporary
    file is removed: nothing half-written is left marked finished)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return write_record(run_dir, record)
    except OSError as e:
        free = shutil.disk_usage(run_dir).free if run_dir.is_dir() else 0
        raise UserError(f"cannot write the record in {run_dir} ({e.strerror or e}; "
                        f"{free / 2**20:.1f} MiB free): free space or set hydra.run.dir / "
                        "hydra.sweep.dir on another disk, then rerun") from None


def plan_jobs(cfg: DictConfig, run_dir: Path, compose=None) -> list[Job]:
    """The variants of this job that still need evaluating (resume skips finished ones),
    each validated before anything loads: a broken one carries its ``error``."""
    jobs = []
    done = finished_records(cfg.get("resume_root"))
    for label, vcfg in variant_configs(cfg, compose=compose, keep_broken=True):
        folder = run_dir / slug(label) if label else run_dir
        spec = vcfg if isinstance(vcfg, UserError) else spec_or_error(vcfg)
        if isinstance(spec, UserError):  # validated before anything loads
            jobs.append(Job(vcfg if spec is not vcfg else None, folder, label, label or "job",
                            error=spec))
            continue
        config = OmegaConf.to_container(vcfg, resolve=True)
        job = Job(vcfg, folder, label, variant_label(config, spec), spec=spec)
        precision = resolve_precision(vcfg.precision, resolve_device(vcfg.device))
        job.key = result_key({**config, "precision": precision}, spec)
        if job.key in done:
            log.info("skip [%s]: finished record %s", job.label, done[job.key])
            continue
        jobs.append(job)
    return jobs


def spec_or_error(cfg: DictConfig) -> HeadSpec | UserError:
    """A variant's validated head, or what is wrong with it (knobs, projection,
    post-processing, proxy): checked before the model loads."""
    try:
        return head_spec_of(cfg)
    except UserError as e:
        return e


@hydra_entry("run")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    jobs = plan_jobs(cfg, run_dir)
    for warning in unused_knobs([job.cfg for job in jobs if job.cfg is not None],
                                HydraConfig.get().overrides.task):
        log.warning(warning)
    if not jobs:
        clear_failed(run_dir)
        print(f"nothing to do: every variant has a finished record under {cfg.resume_root}")
        return None
    records = evaluate(jobs)
    clear_failed(run_dir)
    failed = [job for job in jobs if job.error is not None]
    if failed:  # the others are recorded; the run still fails, naming what did not run
        raise PartialFailure(f"{len(failed)} of {len(jobs)} variants failed: "
                             f"{failed_list(failed)}; each has a failed.json — fix them and "
                             "rerun (resume_root= skips the finished variants)")
    return records[0]["metrics"]["mIoU"] if records else None


if __name__ == "__main__":
    # Call the importable sclip_lab.run.main, not __main__'s copy: launchers (submitit)
    # pickle the task function, which works by reference only for an importable module.
    from sclip_lab.run import main as entry

    entry()
