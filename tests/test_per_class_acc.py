"""mmseg's per-class Acc beside IoU: the metric, the record, the CSV and the console table
(docs/protocol.md §11; mmseg's ``IoUMetric.total_area_to_metrics`` and its log)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab import records
from sclip_lab.config import CONF_DIR
from sclip_lab.console import per_class_table
from sclip_lab.evaluation import class_scores, scores
from sclip_lab.metrics import SegmentationMetrics, confmat_scores

# 4 classes; one image of 4x4 pixels: two ignored (255), class 2 never in the ground truth
# but predicted twice, class 3 nowhere.
TARGET = torch.tensor([[0, 0, 0, 0],
                       [0, 1, 1, 1],
                       [1, 1, 1, 1],
                       [0, 1, 255, 255]])
PRED = torch.tensor([[0, 0, 0, 1],
                     [2, 1, 1, 1],
                     [1, 1, 0, 2],
                     [0, 1, 3, 0]])
# by hand, ignored pixels left out: class 0 has 6 labelled pixels, 4 predicted 0 (TP), one
# predicted 1, one predicted 2; class 1 has 8, 6 predicted 1, one 0, one 2.
HAND_ACC = [4 / 6 * 100, 6 / 8 * 100, math.nan, math.nan]
# IoU: 0 -> 4 / (6 + 5 - 4); 1 -> 6 / (8 + 7 - 6); 2 predicted only -> 0; 3 nowhere -> nan
HAND_IOU = [4 / 7 * 100, 6 / 9 * 100, 0.0, math.nan]
NAMES = ["sky", "tree", "car", "boat"]


def metric_of_example() -> SegmentationMetrics:
    metric = SegmentationMetrics(4)
    metric.update(PRED, TARGET)
    return metric


def assert_same(values, expected):
    for got, want in zip(list(values), expected):
        if math.isnan(want):
            assert got is None or math.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-12)


def test_per_class_acc_is_the_recall_over_ground_truth_pixels():
    out = metric_of_example().compute()
    assert_same(out["per_class_acc"].tolist(), HAND_ACC)
    assert_same(out["per_class_iou"].tolist(), HAND_IOU)
    # a class predicted but absent from the labels: IoU 0, Acc nan (mmseg: 0 / 0)
    assert out["per_class_iou"][2] == 0 and out["per_class_acc"][2].isnan()
    assert float(out["aAcc"]) == pytest.approx(10 / 14 * 100, rel=1e-12)
    # the same numbers straight from a hand-written confusion matrix (rows = target)
    confmat = torch.tensor([[4, 1, 1, 0], [1, 6, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert_same(confmat_scores(confmat)["per_class_acc"].tolist(), HAND_ACC)


def test_macc_is_the_nanmean_of_the_per_class_acc():
    out = metric_of_example().compute()
    assert float(out["mAcc"]) == pytest.approx(float(out["per_class_acc"].nanmean()),
                                               rel=1e-12)
    assert float(out["mAcc"]) == pytest.approx((4 / 6 + 6 / 8) / 2 * 100, rel=1e-12)
    metrics, iou, acc = class_scores(metric_of_example(), NAMES)
    shown = [v for v in acc.values() if v is not None]
    assert metrics["mAcc"] == pytest.approx(sum(shown) / len(shown), abs=1e-4)
    assert acc == {"sky": round(HAND_ACC[0], 4), "tree": 75.0, "car": None, "boat": None}
    # scores (the API's) is unchanged: the metrics and the per-class IoU
    assert scores(metric_of_example(), NAMES) == (metrics, iou)
    raw = class_scores(metric_of_example(), NAMES, digits=None)[2]
    assert raw["sky"] == pytest.approx(HAND_ACC[0], rel=1e-12) and raw["car"] is None


def resolved() -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("run"), resolve=True)


def test_record_gains_per_class_acc_and_keeps_its_key(tmp_path):
    config = resolved()
    key = records.result_key(config)
    metrics, iou, acc = class_scores(metric_of_example(), NAMES)
    rec = records.build_record(config, key, metrics, iou, {"arch": "x"}, 1, {"eval_s": 1.0},
                               per_class_acc=acc)
    assert rec["per_class_iou"] == iou and rec["per_class_acc"] == acc
    assert list(rec["per_class_acc"]) == list(rec["per_class_iou"]) == NAMES
    assert records.result_key(config) == key  # the record's new key is no part of the hash
    back = records.read_record(records.write_record(tmp_path, rec))
    assert back["per_class_acc"] == {"sky": round(HAND_ACC[0], 4), "tree": 75.0,
                                     "car": None, "boat": None}
    without = records.build_record(config, key, metrics, iou, {}, 1, {})
    assert without["per_class_acc"] is None and without["per_class_iou"] == iou


def test_per_class_csv_has_an_acc_column_after_iou(tmp_path):
    _, iou, acc = class_scores(metric_of_example(), NAMES)
    path = tmp_path / records.PER_CLASS_FILE
    records.write_per_class_csv(path, iou, ["sky", "tree, wood", "car", "boat"], acc)
    lines = path.read_text().splitlines()
    assert lines[0] == "class,iou,acc,queries"
    assert lines[1:] == ["sky,57.1429,66.6667,sky", 'tree,66.6667,75.0000,"tree, wood"',
                         "car,0.0000,,car", "boat,,,boat"]
    table = pd.read_csv(path)
    assert list(table.columns) == ["class", "iou", "acc", "queries"]


def test_console_table_is_mmsegs_per_class_and_summary_tables():
    iou = {"background": 93.3249, "aeroplane": 0.0, "potted plant": None}
    acc = {"background": 97.0123, "aeroplane": None, "potted plant": None}
    text = per_class_table(iou, acc, {"aAcc": 95.12345, "mIoU": 46.66245, "mAcc": 97.0123})
    # character for character what prettytable 3.19 draws for mmseg's lists
    assert text.splitlines() == [
        "+--------------+-------+-------+",
        "|    Class     |  IoU  |  Acc  |",
        "+--------------+-------+-------+",
        "|  background  | 93.32 | 97.01 |",
        "|  aeroplane   |  0.0  |  nan  |",
        "| potted plant |  nan  |  nan  |",
        "+--------------+-------+-------+",
        "Summary:",
        "+-------+-------+-------+",
        "|  aAcc |  mIoU |  mAcc |",
        "+-------+-------+-------+",
        "| 95.12 | 46.66 | 97.01 |",
        "+-------+-------+-------+",
    ]


def test_console_table_rounds_as_numpy_does_and_stays_one_class_a_row():
    # np.round(v, 2) rounds v * 100 half to even (12.345 -> 12.34, 2.675 -> 2.68, where
    # Python's round(v, 2) gives 12.35 and 2.67); 100 % shows "100.0" as str(np.float64)
    iou = {"a": 12.345, "b": 100.0, "c": 2.675, "d": float("nan")}
    rows = per_class_table(iou, dict(iou), {"aAcc": None, "mIoU": 1.005, "mAcc": 2.0}
                           ).splitlines()
    assert [r.split("|")[2].strip() for r in rows[3:7]] == ["12.34", "100.0", "2.68", "nan"]
    assert rows[-2] == "| nan  | 1.0  | 2.0  |"
    rng = np.random.default_rng(0)
    values = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0, 100, 500))}
    cells = [r.split("|")[2].strip() for r in per_class_table(values, values, {}
                                                              ).splitlines()[3:503]]
    assert cells == [str(np.round(np.float64(v), 2)) for v in values.values()]
    many = {f"class {i}": float(i) for i in range(171)}  # COCO-Stuff: one line per class
    table = per_class_table(many, many, {"aAcc": 1.0, "mIoU": 1.0, "mAcc": 1.0})
    assert len(table.splitlines()) == 171 + 4 + 1 + 5
    assert max(len(line) for line in table.splitlines()) < 40
