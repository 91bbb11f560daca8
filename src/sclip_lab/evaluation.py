"""The evaluation loop, as a library function: a segmenter over a benchmark's images ->
one confusion matrix per head (docs/protocol.md §11). ``python -m sclip_lab.run`` and
``Segmenter.evaluate`` both call ``evaluate_segmenter``, so they give the same numbers.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sclip_lab.errors import Interrupted, UserError, message_of, plural
from sclip_lab.metrics import SegmentationMetrics
from sclip_lab.records import METRICS, unique_names


@dataclass
class HeadResult:
    """One head's evaluation: its confusion matrix and the first predictions kept.

    Attributes:
        metric: the accumulated ``SegmentationMetrics`` (``compute()`` -> mIoU, …).
        overlays: ``(image id, (H, W, 3) uint8 image, (H, W) int64 class map)`` of the
            first ``keep_overlays`` images, for figures.
    """

    metric: SegmentationMetrics
    overlays: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)


def _as_list(batch: list) -> list:
    return batch


def evaluate_segmenter(segmenter: Any, dataset: Dataset, num_classes: int,
                       images_per_batch: int = 1, num_workers: int = 0,
                       keep_overlays: int = 0, desc: str = "") -> list[HeadResult]:
    """Every head of ``segmenter`` over ``dataset`` in one data pass.

    Args:
        segmenter: a ``pipeline.Segmenter``; its heads share each batch's trunk.
        dataset: items ``{"id", "image" (H, W, 3) uint8, "input" (3, Hr, Wr) preprocessed
            by the segmenter's ``prep``, "label" (H, W) int64}`` (``data.build_dataset``).
        num_classes: the benchmark's class count C (label 255 is ignored).
        images_per_batch: images whose windows share encoder batches (never changes the
            numbers).
        num_workers: DataLoader worker processes decoding and resizing images.
        keep_overlays: predictions kept per head for figures.
        desc: the progress bar's label.

    Returns:
        Per head, in ``segmenter.heads`` order, its ``HeadResult``.

    Raises:
        Interrupted: SIGINT / SIGTERM inside the loop, with how many images were done.
        UserError: a worker's own one-line error (a corrupt image, a label of the wrong
            size), not torch's wrapper around it.
    """
    results = [HeadResult(SegmentationMetrics(num_classes).to(segmenter.device))
               for _ in segmenter.heads]
    loader = DataLoader(dataset, batch_size=images_per_batch, collate_fn=_as_list,
                        num_workers=num_workers, shuffle=False)
    with tqdm(total=len(dataset), desc=desc, unit="img", dynamic_ncols=True) as bar, \
            interrupts_counted(bar, len(dataset)):
        for items in worker_errors_unwrapped(loader):
            labels = [torch.from_numpy(it["label"]).to(segmenter.device) for it in items]
            # class maps straight from the stitching: no logits kept (docs/protocol.md §5.12)
            per_head = segmenter.iter_class_maps([it["input"] for it in items],
                                                 [tuple(lb.shape) for lb in labels])
            for result, preds in zip(results, per_head):
                for it, label, pred in zip(items, labels, preds):
                    result.metric.update(pred, label)
                    if len(result.overlays) < keep_overlays:
                        result.overlays.append((it["id"], it["image"], pred.cpu().numpy()))
            bar.update(len(items))
    return results


def scores(metric: SegmentationMetrics, names: Sequence[str]
           ) -> tuple[dict[str, float], dict[str, float | None]]:
    """``(metrics, per_class)`` as a record holds them: mIoU / aAcc / mAcc in percent, and
    each class's IoU in percent (4 decimals; None for a class absent from both the labels
    and the predictions), keyed by its display name (``names``, made unique)."""
    metrics, iou, _ = class_scores(metric, names)
    return metrics, iou


RECORD_DIGITS = 4  # decimals of the per-class values a record holds


def rounded(per_class: Mapping[str, float | None], digits: int = RECORD_DIGITS
            ) -> dict[str, float | None]:
    """Per-class values rounded to ``digits`` decimals (None stays None)."""
    return {name: None if v is None else round(v, digits) for name, v in per_class.items()}


def class_scores(metric: SegmentationMetrics, names: Sequence[str],
                 digits: int | None = RECORD_DIGITS
                 ) -> tuple[dict[str, float], dict[str, float | None],
                            dict[str, float | None]]:
    """``(metrics, per_class_iou, per_class_acc)``: ``scores`` and each class's Acc in
    percent (mmseg's per-class Acc, TP / (TP + FN); None for a class absent from the
    labels; ``metrics["mAcc"]`` is their mean), both keyed by display name and rounded to
    ``digits`` decimals (None: unrounded, for the console table)."""
    computed = metric.compute()
    keys = unique_names(names)

    def by_name(values: torch.Tensor) -> dict[str, float | None]:
        raw = {name: None if torch.isnan(v) else float(v) for name, v in zip(keys, values)}
        return raw if digits is None else rounded(raw, digits)

    return ({k: float(computed[k]) for k in METRICS}, by_name(computed["per_class_iou"]),
            by_name(computed["per_class_acc"]))


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


@contextmanager
def interrupts_counted(bar: tqdm, total: int) -> Iterator[None]:
    """SIGINT / SIGTERM inside the loop: ``Interrupted`` with how far it got."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        raise Interrupted(signum, f"{bar.n} of {plural(total, 'image')}") from None
