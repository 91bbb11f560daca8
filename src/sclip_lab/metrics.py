"""Dataset-level segmentation metrics on one int64 confusion matrix (docs/protocol.md §11).

mmseg's definition (``IoUMetric.total_area_to_metrics``): areas summed over the whole
dataset, IoU_c = ΣI_c / ΣU_c, classes with ΣU_c = 0 excluded from the mean (NaN-mean), a
class predicted but never present counts 0; Acc_c = ΣI_c / ΣL_c (TP / (TP + FN): the
recall over the class's ground-truth pixels, NaN for a class absent from the ground
truth), mAcc their NaN-mean; aAcc = ΣI / ΣL.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from sclip_lab.data import IGNORE_INDEX


class SegmentationMetrics(MulticlassConfusionMatrix):
    """``update(pred (H, W) or (N, H, W) int64, target same shape)``; target 255 is ignored.

    ``compute()`` returns ``{"mIoU", "aAcc", "mAcc"}`` in percent, ``"per_class_iou"``, a
    ``(C,)`` tensor in percent with NaN for classes absent from both prediction and
    ground truth everywhere, and ``"per_class_acc"``, ``(C,)`` in percent with NaN for
    classes absent from the ground truth (``mAcc`` is its NaN-mean).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 validate_args: bool = False) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index,
                         validate_args=validate_args)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return confmat_scores(self.confmat)


def confmat_scores(confmat: Tensor) -> dict[str, Tensor]:
    """``(C, C)`` counts (rows = target, cols = prediction) -> mmseg's scores in percent."""
    cm = confmat.to(torch.float64)
    inter = cm.diagonal()
    gt, pred = cm.sum(1), cm.sum(0)
    union = gt + pred - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.nan)
    acc = torch.where(gt > 0, inter / gt.clamp_min(1), torch.nan)
    total = cm.sum()
    return {
        "mIoU": iou.nanmean() * 100,
        "aAcc": (inter.sum() / total * 100) if total > 0 else torch.tensor(torch.nan),
        "mAcc": acc.nanmean() * 100,
        "per_class_iou": iou * 100,
        "per_class_acc": acc * 100,
    }
