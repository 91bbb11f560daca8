"""The methods leaderboard's third source: re-runs by others (``table.rerun`` in
conf/sweep/methods.yaml) beside the published ("paper") and our ("reproduced") numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_tables import mt, synthetic

import sclip_lab.tables as tables
from sclip_lab.errors import ConfigError
from sclip_lab.tables import layout

BENCHMARKS = ("voc21", "context60", "coco_object", "voc20", "cityscapes", "context59",
              "ade20k", "coco_stuff")
# PEARL's results figure (PGSmall/PEARL @c26062b, assets/results.png), ViT-B/16.
PEARL_SFP = dict(zip(BENCHMARKS, (56.8, 32.3, 32.1, 83.4, 34.1, 36.0, 18.1, 24.0),
                     strict=True))
BASE = {"model": "ViT-B-16-quickgelu", "pretrained": "openai", "trial": None, "n": None,
        "precision": "fp16", "aAcc": 90.0, "mAcc": 70.0, "num_images": 10, "limit": None}


@pytest.fixture()
def fresh_layout():
    """Table layouts built again from the configs (and again after the test)."""
    tables.table_spec.cache_clear()
    yield
    tables.table_spec.cache_clear()


def write_record(root: Path, key: str, dataset: str, miou: float, count: int) -> None:
    """A finished record that fills the methods table's row ``key`` on ``dataset``."""
    row = next(r for r in mt.table_spec("methods").rows if r.key == key)
    short_side, crop, stride = row.preprocess[dataset]
    summary = {**BASE, **row.match_for(dataset), "dataset": dataset, "mIoU": miou,
               "short_side": short_side, "crop": crop, "stride": stride}
    run = root / f"{count:03d}"
    run.mkdir(parents=True)
    path = run / "result.json"
    path.write_text(json.dumps({"status": "finished", "key": f"{count:08x}",
                                "summary": summary, "sweep": {"table": "methods"}}))
    os.utime(path, (1_700_000_000 + count, 1_700_000_000 + count))


@pytest.fixture(scope="module")
def methods_out(tmp_path_factory) -> Path:
    """The methods table built by the CLI from one SFP and one SCLIP record."""
    root = tmp_path_factory.mktemp("methods-records")
    write_record(root, "sfp", "voc21", 58.25, 1)
    write_record(root, "sclip", "voc21", 59.5, 2)
    out = tmp_path_factory.mktemp("methods-tables")
    assert mt.main(["--root", str(root), "--out", str(out), "--tables", "methods"]) == 0
    return out


def test_methods_csv_has_the_rerun_column_with_the_yaml_values(methods_out):
    csv = pd.read_csv(methods_out / "methods.csv", index_col=0)
    for name in (*BENCHMARKS, "avg"):  # <bench>_rerun sits between _paper and _delta
        at = list(csv.columns).index(f"{name}_paper")
        assert list(csv.columns)[at:at + 3] == [f"{name}_paper", f"{name}_rerun",
                                                f"{name}_delta"]
    sfp = csv.loc["SFP"]
    for name, value in PEARL_SFP.items():
        assert sfp[f"{name}_rerun"] == pytest.approx(value, rel=0.0, abs=1e-9)
    assert sfp["avg_rerun"] == pytest.approx(39.6, rel=0.0, abs=1e-9)
    assert sfp["voc21_mean"] == 58.25 and np.isnan(sfp["voc21_paper"])
    # Δ stays reproduced − paper; the re-run does not enter it.
    assert csv.loc["SCLIP", "voc21_delta"] == pytest.approx(59.5 - 59.1, abs=1e-9)


def test_rows_without_a_rerun_are_empty(methods_out):
    csv = pd.read_csv(methods_out / "methods.csv", index_col=0)
    rerun = csv[[c for c in csv.columns if c.endswith("_rerun")]]
    assert rerun.drop(index="SFP").isna().all().all()
    assert csv.loc["NACLIP", "voc20_paper"] == pytest.approx(79.7, abs=1e-9)  # paper kept


def test_latex_and_observations_show_the_three_sources(methods_out, tmp_path):
    tex = (methods_out / "methods.tex").read_text(encoding="utf-8")
    assert "Method & reproduced & paper & re-run & $\\Delta$ & reproduced" in tex
    assert r"\multicolumn{4}{c}{VOC21}" in tex
    assert "Re-run: an independent re-run published by others (SFP: PEARL's re-run " \
           "(assets/results.png))." in tex
    sfp_line = next(line for line in tex.splitlines() if line.startswith("SFP &"))
    assert sfp_line.startswith("SFP & 58.2 & -- & 56.8 & -- & -- & -- & 32.3 & --")
    spec = mt.table_spec("methods")
    assert spec.rerun_source == {"sfp": "PEARL's re-run (assets/results.png)"}
    table = mt.build_table("methods", [])
    obs = table.observations
    rerun = obs[obs["source"] == tables.RERUN]
    assert set(rerun["row"]) == {"SFP"} and len(rerun) == len(BENCHMARKS)
    assert dict(zip(rerun["dataset"], rerun["mIoU"], strict=True)) == {
        spec.columns[name]: value for name, value in PEARL_SFP.items()}
    display = mt.display_frame(table, decimals=1)
    assert display[("VOC21", tables.RERUN)].loc["SFP"] == "56.8"
    assert display[("VOC21", tables.RERUN)].loc["NACLIP"] == tables.MISSING


def _with_table(monkeypatch, **changes):
    """conf/sweep/methods.yaml as if its table: section had ``changes``."""
    read = layout.sweep

    def sweep(number):
        config = read(number)
        if number == "methods":
            for key, value in changes.items():
                config.table[key] = value
        return config

    monkeypatch.setattr(layout, "sweep", sweep)


def test_a_bad_rerun_row_key_is_one_clear_error(monkeypatch, capsys, tmp_path, fresh_layout):
    _with_table(monkeypatch, rerun={"sfpp": {"voc21": 50.0}}, rerun_source={"sfpp": "x"})
    with pytest.raises(ConfigError) as info:
        mt.table_spec("methods")
    message = str(info.value)
    assert "conf/sweep/methods.yaml: table.rerun has row 'sfpp'" in message
    assert "did you mean 'sfp'?" in message and "add a rows: entry with key: sfpp" in message
    assert mt.main(["--root", str(tmp_path), "--out", str(tmp_path / "out"),
                    "--tables", "methods"]) == 2
    # (in-process, other tests' log handlers may add noise of their own: count our lines)
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("error:")]
    assert len(errors) == 1 and "table.rerun has row 'sfpp'" in errors[0]


@pytest.mark.parametrize(("changes", "expected"), [
    ({"rerun": {"sfp": {"voc12": 50.0}}},
     "table.rerun.sfp has benchmark 'voc12', which is not a column (did you mean 'voc21'?)"),
    ({"rerun_avg": {"sfpp": 40.0}}, "table.rerun_avg has row 'sfpp'"),
    ({"rerun_source": {"sfp": "x", "nope": "y"}}, "table.rerun_source has row 'nope'"),
    ({"rerun_source": {}}, "table.rerun of sfp has no source; add table.rerun_source"),
    ({"rerun": {"sfp": {"voc21": "n/a"}}}, "table.rerun.sfp.voc21=n/a must be a finite number"),
    ({"paper": {"sclip_x": {"voc21": 50.0}}}, "table.paper has row 'sclip_x'"),
])
def test_other_bad_sections_name_the_fix(monkeypatch, fresh_layout, changes, expected):
    _with_table(monkeypatch, **changes)
    with pytest.raises(ConfigError, match="conf/sweep/methods.yaml") as info:
        mt.table_spec("methods")
    assert expected in str(info.value)


def test_tables_without_reruns_are_unchanged(tmp_path):
    root, out = tmp_path / "records", tmp_path / "out"
    synthetic(root)
    assert mt.main(["--root", str(root), "--out", str(out), "--tables", "1", "2", "3", "4",
                    "clearclip_grid", "naclip_grid"]) == 0
    for stem in ("table1", "table2", "table3", "table4", "clearclip_grid", "naclip_grid"):
        csv = pd.read_csv(out / f"{stem}.csv", index_col=0)
        assert not [c for c in csv.columns if "rerun" in c], stem
        assert all(c.rsplit("_", 1)[-1] in (*mt.CSV_STATS, "side", "window", "stride",
                                            "flops", "paper") for c in csv.columns), stem
        tex = (out / f"{stem}.tex").read_text(encoding="utf-8")
        assert "re-run" not in tex and "Re-run" not in tex, stem
    table1 = pd.read_csv(out / "table1.csv", index_col=0)
    assert list(table1.columns[:7]) == ["voc21_mean", "voc21_std", "voc21_k", "voc21_partial",
                                        "voc21_paper", "voc21_delta", "context60_mean"]
    for number in (1, 2, 3, 4, "clearclip_grid", "naclip_grid"):
        spec = mt.table_spec(number)
        assert not spec.has_rerun and not spec.rerun_source, number
        table = mt.build_table(number, [])
        assert table.rerun.empty and tables.RERUN not in set(table.observations["source"])
        assert tables.RERUN not in {stat for _, stat in mt.display_frame(table, 1).columns}
