"""mIoU as mmseg defines it (docs/protocol.md §11), against numpy."""

from __future__ import annotations

import numpy as np
import torch

from sclip_lab.metrics import SegmentationMetrics


def numpy_miou(preds, gts, C):
    inter = np.zeros(C, np.int64)
    area_p = np.zeros(C, np.int64)
    area_g = np.zeros(C, np.int64)
    for p, g in zip(preds, gts):
        m = g != 255
        p, g = p[m], g[m]
        inter += np.bincount(p[p == g], minlength=C)
        area_p += np.bincount(p, minlength=C)
        area_g += np.bincount(g, minlength=C)
    union = area_p + area_g - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return np.nanmean(iou) * 100, iou * 100, inter.sum() / area_g.sum() * 100


def test_dataset_level_miou_with_absent_and_only_predicted_classes():
    rng = np.random.default_rng(0)
    C = 6
    preds, gts = [], []
    for shape in [(7, 9), (11, 5), (8, 8)]:
        g = rng.choice([0, 1, 2, 255], size=shape)      # 3, 4, 5 never in ground truth
        p = rng.choice([0, 1, 2, 4], size=shape)        # 4 predicted only; 3, 5 nowhere
        preds.append(p)
        gts.append(g)
    metric = SegmentationMetrics(C)
    for p, g in zip(preds, gts):
        metric.update(torch.from_numpy(p), torch.from_numpy(g))
    out = metric.compute()
    miou, iou, aacc = numpy_miou(preds, gts, C)
    assert metric.confmat.dtype == torch.int64
    assert out["per_class_iou"][[3, 5]].isnan().all()
    assert out["per_class_iou"][4] == 0
    np.testing.assert_allclose(out["per_class_iou"].numpy(), iou, rtol=1e-12)
    np.testing.assert_allclose(float(out["mIoU"]), miou, rtol=1e-12)
    np.testing.assert_allclose(float(out["aAcc"]), aacc, rtol=1e-12)
    # a dataset ratio, not a mean of per-image mIoUs
    per_image = np.mean([numpy_miou([p], [g], C)[0] for p, g in zip(preds, gts)])
    assert abs(per_image - miou) > 1e-6
