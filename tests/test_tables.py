"""sclip_lab.tables and analysis/make_tables.py: tables from synthetic result records (no
network, no model)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import sclip_lab.tables as tables

REPO = Path(__file__).resolve().parents[1]


def _load_make_tables():
    """Import the script by path, as users run it (``python analysis/make_tables.py``)."""
    spec = importlib.util.spec_from_file_location("make_tables",
                                                  REPO / "analysis" / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# The package's API, and the CLI's main from the script.
mt = SimpleNamespace(**{name: getattr(tables, name) for name in tables.__all__},
                     main=_load_make_tables().main)

SHORT_SIDE = {"voc21": 336, "context59": 336, "coco_stuff": 448, "context60": 336,
              "coco_object": 336, "voc20": 336, "cityscapes": 560, "ade20k": 336}
BASE = {"model": "ViT-B-16-quickgelu", "pretrained": "openai", "attention": "csa",
        "projection": "qk", "n": None, "trial": None, "combine": "sum", "temperature": 8.0,
        "window": None, "layer": None, "postprocess": "none", "crop": 224, "stride": 112,
        "precision": "fp16", "aAcc": 90.0, "mAcc": 70.0, "num_images": 1449, "limit": None}
VANILLA = {"attention": "vanilla", "projection": None, "combine": None, "temperature": None}


class Records:
    """Writes ``result.json`` files with increasing mtimes (call order = age order)."""

    def __init__(self, root: Path):
        self.root, self.count = root, 0

    def add(self, dataset: str, miou: float, *, status: str = "finished", subdir: str = "",
            mtime: float | None = None, **fields) -> Path:
        self.count += 1
        summary = {**BASE, "dataset": dataset, "short_side": SHORT_SIDE[dataset],
                   "mIoU": miou, **fields}
        run = self.root / subdir / f"{self.count:03d}"
        run.mkdir(parents=True)
        path = run / "result.json"
        path.write_text(json.dumps({"status": status, "key": f"{self.count:08x}",
                                    "summary": summary, "sweep": {"table": None}}))
        stamp = 1_700_000_000 + (self.count if mtime is None else mtime)
        os.utime(path, (stamp, stamp))
        return path


def synthetic(root: Path) -> Records:
    """The record set behind the exact-CSV tests (also the README example)."""
    rec = Records(root)
    rec.add("voc21", 50.0, subdir="old")                        # superseded re-run
    rec.add("voc21", 59.63)                                     # newest qk wins
    rec.add("voc21", 99.0, status="failed")                     # ignored
    rec.add("context59", 34.46)
    rec.add("coco_stuff", 22.77)
    rec.add("voc21", 57.4, projection="identity", combine=None)
    rec.add("voc21", 10.0, projection="random", n=1, trial=0, combine="mean")
    rec.add("voc21", 57.0, projection="random", n=1, trial=0, combine="mean")  # re-run
    for trial, value in enumerate([58.0, 58.2, 58.4]):
        rec.add("voc21", value, projection="random", n=4, trial=trial, combine="mean")
    for tau, value in [(8.0, 18.5), (2.0, 21.0), (0.0, 14.0)]:
        rec.add("voc21", value, attention="sharpen", projection=None, combine=None,
                temperature=tau)
    rec.add("voc21", 43.0, attention="local", projection=None, combine=None, temperature=None,
            window=3)
    rec.add("context59", 26.0, attention="early", projection=None, combine=None,
            temperature=None, layer=3)
    rec.add("voc21", 19.0, **VANILLA)
    rec.add("voc21", 44.0, attention="maskclip", projection=None, combine=None,
            temperature=None)
    rec.add("voc21", 60.0, postprocess="pamr")
    rec.add("voc21", 56.6, short_side=224)
    rec.add("voc21", 60.5, short_side=448)
    rec.add("voc21", 12.0, model="ViT-B-32-quickgelu")          # another model: filtered
    return rec


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """All four tables built once by the CLI from the synthetic records."""
    root = tmp_path_factory.mktemp("multirun")
    synthetic(root)
    out = tmp_path_factory.mktemp("tables")
    assert mt.main(["--root", str(root), "--out", str(out)]) == 0
    return out


def summaries(root: Path) -> list[dict]:
    return mt.select_model(mt.load_local_records(root))[0]


TABLE2_CSV = """\
Mode,voc21_mean,voc21_std,voc21_k,voc21_partial,voc21_paper,voc21_delta,context59_mean,\
context59_std,context59_k,context59_partial,context59_paper,context59_delta,coco_stuff_mean,\
coco_stuff_std,coco_stuff_k,coco_stuff_partial,coco_stuff_paper,coco_stuff_delta
Identity projection,57.4,,1,False,57.5,-0.1,,,0,False,33.0,,,,0,False,21.5,
W_q projection,,,0,False,58.2,,,,0,False,33.5,,,,0,False,21.7,
W_k projection,,,0,False,58.4,,,,0,False,33.1,,,,0,False,21.8,
Learned projection,,,0,False,60.4,,,,0,False,34.7,,,,0,False,22.6,
Random n=1,57.0,,1,False,57.1,-0.1,,,0,False,32.4,,,,0,False,20.6,
Random n=4,58.2,0.2,3,False,58.0,0.2,,,0,False,32.7,,,,0,False,20.9,
Random n=16,,,0,False,58.1,,,,0,False,32.7,,,,0,False,21.2,
Default (qk),59.63,,1,False,59.1,0.53,34.46,,1,False,34.2,0.26,22.77,,1,False,22.4,0.37
"""

TABLE4_CSV = """\
Mode,short_side,window,stride,flops,flops_paper,voc21_mean,voc21_std,voc21_k,voc21_partial,\
voc21_paper,voc21_delta,context59_mean,context59_std,context59_k,context59_partial,\
context59_paper,context59_delta,coco_stuff_mean,coco_stuff_std,coco_stuff_k,\
coco_stuff_partial,coco_stuff_paper,coco_stuff_delta
#1,224,224,112,1.0,1.0,56.6,,1,False,56.5,0.1,,,0,False,32.0,,,,0,False,20.5,
#2,336,224,112,3.0,4.0,59.63,,1,False,59.1,0.53,34.46,,1,False,34.2,0.26,,,0,False,22.4,
#3,336,336,112,2.3568,3.0,,,0,False,58.6,,,,0,False,34.1,,,,0,False,21.9,
#4,448,224,112,7.5,9.0,60.5,,1,False,60.4,0.1,,,0,False,35.3,,22.77,,1,False,23.4,-0.63
#5,448,448,224,4.4672,4.0,,,0,False,58.9,,,,0,False,34.3,,,,0,False,22.1,
"""


def read_csv(path: Path) -> pd.DataFrame:
    """A table's CSV as a user loads it."""
    return pd.read_csv(path, index_col=0)


def exact(value):
    """A value written to the CSV, as read back (pandas 2's parser may be 1 ulp off)."""
    return pytest.approx(value, rel=0.0, abs=1e-9)


def test_table2_csv_exact(built):
    # Newest qk re-run wins (59.63, not 50.0), the failed 99.0 is ignored, trials averaged.
    assert (built / "table2.csv").read_text(encoding="utf-8") == TABLE2_CSV


def test_table4_csv_exact_with_counted_flops(built):
    # COCO-Stuff's default short side is 448, so its default run is mode #4, not #2.
    assert (built / "table4.csv").read_text(encoding="utf-8") == TABLE4_CSV


def test_table3_rows_match_their_knobs(built):
    frame = read_csv(built / "table3.csv")
    voc = ["voc21_mean", "voc21_paper", "voc21_delta"]
    assert list(frame.loc["Sharpening τ=8 (CLIP default)", voc]) == exact([18.5, 18.8, -0.3])
    assert frame.loc["Sharpening τ=0 (hard max)", "voc21_mean"] == exact(14.0)
    assert np.isnan(frame.loc["Sharpening τ=0.5", "voc21_mean"])
    assert list(frame.loc["Local window=3", voc]) == exact([43.0, 42.9, 0.1])
    assert list(frame.loc["Early layer #3", ["context59_mean", "context59_paper",
                                             "context59_delta"]]) == exact([26.0, 26.4, -0.4])
    # The paper's "SCLIP (ours)" is the method SCLIP: "ours" never names a row here.
    assert frame.loc["SCLIP", "voc21_mean"] == exact(59.63)
    assert not any("ours" in label for label in frame.index)


def test_table1_rows_and_average(tmp_path):
    rec = Records(tmp_path)
    values = dict(zip(mt.TABLE1_COLUMNS, [59.63, 31.74, 33.52, 81.54, 32.34, 34.46, 16.45,
                                          22.77], strict=True))
    for dataset, value in values.items():  # Cityscapes from part of its split
        rec.add(dataset, value, limit=2 if dataset == "cityscapes" else None)
    rec.add("voc21", 19.0, **VANILLA)
    table = mt.build_table(1, summaries(tmp_path))
    frame = mt.csv_frame(table)
    sclip = frame.loc["SCLIP"]
    assert sclip["avg_mean"] == pytest.approx(39.05625, abs=1e-4)  # the README's 39.06
    assert sclip["avg_paper"] == 38.2
    assert sclip["avg_delta"] == pytest.approx(0.85625, abs=1e-4)
    assert sclip["avg_k"] == 1 and sclip["avg_partial"]  # partial: one benchmark is
    assert sclip["cityscapes_partial"] and not sclip["voc21_partial"]
    assert frame.loc["CLIP", "voc21_mean"] == 19.0
    assert np.isnan(frame.loc["CLIP", "avg_mean"])  # one benchmark is not an average
    assert frame.loc["CLIP", "avg_k"] == 0 and not frame.loc["CLIP", "avg_partial"]
    assert list(frame.index) == ["CLIP", "MaskCLIP", "SCLIP", "CLIP*", "MaskCLIP*", "SCLIP*"]
    assert frame.index.name == "Method"


def test_latex_has_booktabs_and_bold_best(built):
    tex = (built / "table2.tex").read_text(encoding="utf-8")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\multicolumn{3}{c}{VOC21}"):
        assert rule in tex
    assert r"\textbf{59.6} & 59.1 & +0.5" in tex  # best reproduced value, one decimal
    assert r"58.2 $\pm$ 0.2 (3)" in tex
    assert r"\textbf{57.4}" not in tex and r"\textbf{59.1}" not in tex  # paper never bold
    # The sources are "reproduced" and "paper"; "ours" is the paper's word for its method.
    assert "Mode & reproduced & paper & $\\Delta$ & reproduced & paper & $\\Delta$" in tex
    assert "ours" not in tex and r"\dagger" not in tex  # no partial cell here
    assert "ours" not in (built / "table3.tex").read_text(encoding="utf-8")
    tex1 = (built / "table1.tex").read_text(encoding="utf-8")
    assert r"mIoU (\%)" in tex1 and r"\textbf{60.0}" in tex1  # SCLIP* is VOC21's best
    # LaTeX numbers the caption itself: it must not start with "Table 1:" again
    assert r"\caption{mIoU" in tex1 and "(the paper's Table 1)" in tex1
    tex4 = (built / "table4.tex").read_text(encoding="utf-8")
    assert r"\#4 & 448 & 224 & 112 & 7.5$\times$ & $\sim$9$\times$" in tex4


def test_figures_written(built):
    for n in (1, 2, 3, 4):
        png, pdf = built / f"table{n}.png", built / f"table{n}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pdf.read_bytes()[:5] == b"%PDF-"


def test_csv_reads_back_as_numbers(built):
    frame = read_csv(built / "table2.csv")
    assert frame.index.name == "Mode"
    assert list(frame.columns) == [f"{d}_{stat}" for d in ("voc21", "context59", "coco_stuff")
                                   for stat in mt.CSV_STATS]
    for column, dtype in frame.dtypes.items():
        want = {"k": "int64", "partial": "bool"}.get(column.rsplit("_", 1)[1], "float64")
        assert dtype == want, column
    random4, w_q = frame.loc["Random n=4"], frame.loc["W_q projection"]
    assert [random4["voc21_mean"], random4["voc21_std"]] == exact([58.2, 0.2])
    assert random4["voc21_k"] == 3
    assert np.isnan(frame.loc["Random n=1", "voc21_std"])  # one trial has no spread
    assert w_q[["voc21_mean", "voc21_std", "voc21_delta"]].isna().all()  # missing: empty
    assert w_q["voc21_k"] == 0 and w_q["voc21_paper"] == exact(58.2)
    assert not frame.filter(like="_partial").to_numpy().any()
    table4 = read_csv(built / "table4.csv")
    assert list(table4.columns[:5]) == ["short_side", "window", "stride", "flops",
                                        "flops_paper"]
    assert (table4.dtypes.iloc[:3] == "int64").all() and table4.dtypes["flops"] == "float64"
    assert list(table4["flops_paper"]) == exact([1.0, 4.0, 3.0, 9.0, 4.0])  # "~4×" is 4


def _partial_table(root: Path):
    """Table 2 with a partial plain cell (Context59) and partial random trials (COCO-Stuff)."""
    rec = Records(root)
    rec.add("voc21", 59.6)
    rec.add("context59", 30.0, limit=8)
    for trial, value in enumerate([20.0, 21.0, 22.5]):
        rec.add("coco_stuff", value, projection="random", n=4, trial=trial, combine="mean",
                limit=8)
    return mt.build_table(2, summaries(root))


def test_partial_cells_are_marked_in_every_rendering(tmp_path):
    table = _partial_table(tmp_path / "records")
    out = tmp_path / "out"
    out.mkdir()
    mt.write_table(table, out)
    frame = read_csv(out / "table2.csv")
    partial = frame.filter(like="_partial")
    assert partial.dtypes.eq("bool").all()
    assert sorted(partial.stack()[lambda flags: flags].index) == [
        ("Default (qk)", "context59_partial"), ("Random n=4", "coco_stuff_partial")]
    random4 = frame.loc["Random n=4"]
    assert random4["coco_stuff_mean"] == exact(21.1667)  # four decimals
    assert random4["coco_stuff_std"] == exact(1.2583)
    assert random4["coco_stuff_k"] == 3
    note = "partial split (limit=8): not the whole benchmark"
    tex = (out / "table2.tex").read_text(encoding="utf-8")
    assert r"\textbf{59.6} & 59.1 & +0.5 & \textbf{30.0$^\dagger$} & 34.2 & $-$4.2" in tex
    assert r"\textbf{21.2 $\pm$ 1.3 (3)$^\dagger$} & 20.9 & +0.3" in tex
    assert f"$\\Delta$ = reproduced $-$ paper. $^\\dagger$ {note}.}}" in tex
    text = mt.console_text(table)
    assert "30.00† (-4.20)" in text and "21.17 ± 1.26 (3)† (+0.27)" in text
    assert text.splitlines()[-1] == f"† {note}"
    assert mt.notes(mt.build_table(2, [])) == []  # no partial cell, no note


def test_figure_marks_missing_and_partial_cells_on_a_shared_x_range(tmp_path):
    table = _partial_table(tmp_path)
    fig = mt.figure_of(table)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["VOC21", "Context59", "COCO-Stuff"]
    for ax, name in zip(panels, table.spec.columns, strict=True):
        ours, paper = table.ours[name], table.paper[name]
        # A bar per value (none of zero length for a missing one), "n/a" per missing value.
        assert len(ax.patches) == ours.notna().sum() + paper.notna().sum()
        assert [t.get_text() for t in ax.texts] == ["n/a"] * int(ours.isna().sum())
        hatched = [p for p in ax.patches if p.get_hatch()]
        assert len(hatched) == table.partial[name].sum()
        assert sorted(p.get_width() for p in hatched) == sorted(ours[table.partial[name]])
    assert len({ax.get_xlim() for ax in panels}) == 1  # one x-range for every panel
    assert panels[0].get_xlim()[1] >= np.nanmax(table.paper.to_numpy())
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["reproduced", "paper", "partial split (limit=8)", "n/a: no value"]


def test_empty_root_warns_and_writes_paper_only_tables(tmp_path, caplog, capsys):
    root, out = tmp_path / "multirun", tmp_path / "tables"
    root.mkdir()
    with caplog.at_level(logging.WARNING):
        assert mt.main(["--root", str(root), "--out", str(out), "--tables", "2", "4"]) == 0
    assert "no finished result records" in caplog.text
    assert "24 of 24 cells have no record" in caplog.text
    lines = (out / "table2.csv").read_text(encoding="utf-8").splitlines()
    assert lines[1] == "Identity projection,,,0,False,57.5,,,,0,False,33.0,,,,0,False,21.5,"
    assert (out / "table4.png").exists() and (out / "table4.tex").exists()
    assert "Table 2" in capsys.readouterr().out


def test_unfinished_records_ignored(tmp_path):
    rec = Records(tmp_path)
    rec.add("voc21", 70.0, status="running")
    rec.add("voc21", 71.0, status="failed")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{not json")
    assert mt.load_local_records(tmp_path) == []
    assert mt.build_table(2, []).ours.isna().all().all()


def test_newest_record_wins_by_mtime_not_path(tmp_path):
    rec = Records(tmp_path)
    rec.add("voc21", 59.0, subdir="b", mtime=10)
    rec.add("voc21", 58.0, subdir="a", mtime=20)  # sorts first by path, but is newer
    assert mt.build_table(2, summaries(tmp_path)).ours.loc["qk", "voc21"] == 58.0


def test_random_trials_mean_std_and_rerun_of_one_trial(tmp_path, caplog):
    rec = Records(tmp_path)
    random = {"projection": "random", "n": 16, "combine": "mean"}
    for trial, value in enumerate([58.0, 58.5, 57.5, 58.0, 58.0]):
        rec.add("voc21", value, trial=trial, **random)
    rec.add("voc21", 59.0, trial=4, **random)  # re-run replaces trial 4's 58.0
    with caplog.at_level(logging.WARNING):
        table = mt.build_table(2, summaries(tmp_path))
    assert table.trials.loc["random_16", "voc21"] == 5
    assert table.ours.loc["random_16", "voc21"] == pytest.approx(58.2)
    assert table.std.loc["random_16", "voc21"] == pytest.approx(0.5701, abs=1e-4)
    assert "fewer than" not in caplog.text
    assert sorted(table.observations.query("source == 'reproduced'")["mIoU"]) == [
        57.5, 58.0, 58.0, 58.5, 59.0]


def test_rows_need_exact_settings(tmp_path):
    rec = Records(tmp_path)
    rec.add("voc21", 1.0, combine="mean")                         # qk with mean: not default
    rec.add("voc21", 2.0, temperature=4.0)                        # other csa temperature
    rec.add("voc21", 3.0, crop=448, stride=224)                   # not the default windows
    rec.add("voc21", 4.0, projection="random", n=4, trial=0, combine="sum")
    table = mt.build_table(2, summaries(tmp_path))
    assert table.ours.isna().all().all()


def test_paper_preset_takes_336_for_coco_stuff(tmp_path):
    rec = Records(tmp_path)
    rec.add("coco_stuff", 22.4, short_side=336)
    records = summaries(tmp_path)
    assert mt.build_table(2, records).ours.isna().all().all()  # sclip default is 448
    assert mt.build_table(2, records, preset="paper").ours.loc["qk", "coco_stuff"] == 22.4


def test_hand_made_record_with_missing_defaults(tmp_path):
    # Only a config block: the summary is derived; csa without projection means qk + sum.
    config = {"dataset": {"name": "voc21"}, "model": {"arch": "ViT-B-16-quickgelu",
                                                      "pretrained": "openai"},
              "attention": {"name": "csa", "temperature": 8.0}, "projection": None,
              "postprocess": {"name": "none"},
              "preprocess": {"short_side": 336, "window": 224, "stride": 112}, "limit": None}
    run = tmp_path / "by-hand"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "finished", "config": config,
                                                 "metrics": {"mIoU": 59.5}}))
    records = mt.load_local_records(tmp_path)
    assert records[0]["projection"] == "qk" and records[0]["combine"] == "sum"
    assert mt.build_table(2, records).ours.loc["qk", "voc21"] == 59.5


def test_full_record_beats_newer_partial_one(tmp_path, caplog):
    rec = Records(tmp_path)
    rec.add("voc21", 59.6)
    rec.add("voc21", 40.0, limit=1)  # a newer smoke run must not replace the real result
    rec.add("context59", 30.0, limit=1)
    with caplog.at_level(logging.WARNING):
        table = mt.build_table(2, summaries(tmp_path))
    assert table.ours.loc["qk", "voc21"] == 59.6
    assert table.ours.loc["qk", "context59"] == 30.0
    assert "partial evaluations (limit set): Default (qk) / Context59" in caplog.text


def test_model_filter_defaults_to_most_common(tmp_path, caplog):
    rec = Records(tmp_path)
    rec.add("voc21", 59.6)
    rec.add("context59", 34.5)
    rec.add("voc21", 12.0, model="ViT-B-32-quickgelu")
    records = mt.load_local_records(tmp_path)
    with caplog.at_level(logging.WARNING):
        kept, model = mt.select_model(records)
    assert model == "ViT-B-16-quickgelu" and len(kept) == 2
    assert "ViT-B-32-quickgelu/openai (1)" in caplog.text
    kept, model = mt.select_model(records, model="ViT-B-32-quickgelu")
    assert [r["mIoU"] for r in kept] == [12.0]


def test_wandb_runs_become_summaries(monkeypatch):
    """The W&B path with a fake API: config + summary metrics -> the same summary schema."""
    import wandb

    config = {"dataset": {"name": "voc21"}, "model": {"arch": "ViT-B-16-quickgelu",
                                                      "pretrained": "openai"},
              "attention": {"name": "csa", "temperature": 8.0, "combine": None},
              "projection": {"name": "random", "n": 4, "trial": 2, "combine": "mean"},
              "postprocess": {"name": "none"},
              "preprocess": {"short_side": 336, "window": 224, "stride": 112}}
    runs = [SimpleNamespace(state="finished", id="a", created_at="2025-01-02T00:00:00Z",
                            summary={"mIoU": 58.1, "_step": 0}, config=config),
            SimpleNamespace(state="crashed", id="b", created_at="2025-01-03T00:00:00Z",
                            summary={"mIoU": 1.0}, config=config)]

    class FakeApi:
        def __init__(self, **kwargs):
            pass

        def runs(self, project):
            assert project == "me/sclip"
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    records = mt.load_wandb_records("me/sclip")
    assert len(records) == 1
    assert {k: records[0][k] for k in ("projection", "n", "trial", "combine", "mIoU")} == {
        "projection": "random", "n": 4, "trial": 2, "combine": "mean", "mIoU": 58.1}
    assert mt.build_table(2, records).ours.loc["random_4", "voc21"] == 58.1


def test_misuse_exits_with_one_line(tmp_path, capsys):
    assert mt.main(["--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err
    assert mt.main(["--root", str(tmp_path), "--tables", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no table '5'; tables are 1, 2, 3, 4, clearclip_grid" in err
    with pytest.raises(SystemExit) as exit_info:
        mt.main(["--root", str(tmp_path), "--preset", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'nope'" in err


# ------------------------------------------------------------- rows come from the configs


def test_rows_come_from_the_sweep_configs():
    from omegaconf import OmegaConf

    from sclip_lab.config import CONF_DIR
    from sclip_lab.tables import paper

    for number, values in ((1, paper.TABLE1), (2, paper.TABLE2), (3, paper.TABLE3),
                           (4, paper.TABLE4)):
        keys = [r.key for r in mt.table_spec(number).rows]
        assert len(set(keys)) == len(keys) and set(keys) == set(values), number
        if number < 4:  # every variant the sweep runs lands in a row
            assert tables.uncovered_variants(number) == [], number
    modes = {r.key: r.preprocess for r in mt.table_spec(4).rows}
    for name, mode in modes.items():
        conf = OmegaConf.load(CONF_DIR / "preprocess" / f"{name}.yaml")
        assert mode == (conf.short_side, conf.window, conf.stride)
    assert list(modes) == list(mt.preprocess_modes()) == list(paper.TABLE4_FLOPS)


def test_row_match_fields_are_the_composed_summary():
    from sclip_lab.attention import DEFAULT_COMBINE, DEFAULT_PROJECTION, HEAD_TEMPERATURE

    rows = {n: {r.key: r for r in mt.table_spec(n).rows} for n in (1, 2, 3, 4)}
    # every row matches its block and protocol too
    block = {"residual": True, "ffn": True, "alpha": 1.0, "protocol": "sclip"}
    sclip = {"attention": "csa", "projection": DEFAULT_PROJECTION, "combine": DEFAULT_COMBINE,
             "temperature": HEAD_TEMPERATURE, "postprocess": "none", **block}
    assert rows[1]["sclip"].match == sclip == rows[2]["qk"].match == rows[4]["mode3"].match
    assert rows[1]["clip_pamr"].match == {"attention": "vanilla", "postprocess": "pamr",
                                          **block}
    # A one-map projection set sums and averages alike: combine is not matched.
    assert rows[2]["learned"].match == {"attention": "csa", "projection": "learned",
                                        "temperature": HEAD_TEMPERATURE, "postprocess": "none",
                                        **block}
    assert rows[2]["random_4"].trials and not rows[2]["qk"].trials
    assert rows[2]["random_4"].match["n"] == 4 and rows[2]["random_4"].match["combine"] == "mean"
    assert rows[3]["sharpen_0.5"].match == {"attention": "sharpen", "temperature": 0.5,
                                            "postprocess": "none", **block}
    assert rows[3]["local_7"].match["window"] == 7 and rows[3]["early_5"].match["layer"] == 5
    assert rows[4]["mode5"].preprocess == (448, 448, 224)


@pytest.fixture()
def fresh_layout():
    """Table layouts built again from the configs (and again after the test)."""
    tables.table_spec.cache_clear()
    yield
    tables.table_spec.cache_clear()


def test_a_new_row_is_a_config_change(tmp_path, monkeypatch, fresh_layout):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from sclip_lab.config import CONF_DIR
    from sclip_lab.tables import layout

    read = layout.sweep

    def sweep(number):  # as if conf/sweep/table3.yaml had one more variant and row
        config = read(number)
        if number == 3:
            config.variants.append("attention=naclip sigma=3")
            config.rows.append(OmegaConf.create({"variant": "attention=naclip sigma=3",
                                                 "key": "naclip_3", "label": "NACLIP σ=3"}))
        return config

    monkeypatch.setattr(layout, "sweep", sweep)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # a caller's own Hydra
        row = mt.table_spec(3).rows[-1]
        assert GlobalHydra.instance().is_initialized()
        assert compose("run", overrides=["attention=local"]).attention.name == "local"
    assert (row.key, row.label, row.latex) == ("naclip_3", "NACLIP σ=3", "NACLIP σ=3")
    assert row.match == {"attention": "naclip", "sigma": 3, "postprocess": "none",
                         "residual": False, "ffn": False, "alpha": 1.0, "protocol": "sclip"}
    rec = Records(tmp_path)
    rec.add("voc21", 41.0, attention="naclip", sigma=3.0, projection=None, combine=None,
            temperature=None)
    table = mt.build_table(3, summaries(tmp_path))
    assert table.ours.loc["naclip_3", "voc21"] == 41.0
    assert table.paper.loc["naclip_3"].isna().all()  # the paper has no such row


def test_a_variant_without_a_row_is_named(monkeypatch, caplog, fresh_layout):
    from sclip_lab.tables import layout

    read = layout.sweep

    def sweep(number):
        config = read(number)
        config.variants.append("attention=local window=9")
        return config

    monkeypatch.setattr(layout, "sweep", sweep)
    with caplog.at_level(logging.WARNING):
        keys = [r.key for r in mt.table_spec(3).rows]
    assert "local_9" not in keys
    assert "variant 'attention=local window=9' has no entry in rows:" in caplog.text
