"""benchmarks/bench_backbones.py cannot rot: one open_clip and one timm preset, one window."""

from __future__ import annotations

import json
import runpy
import sys

from conftest import REPO


def test_the_backbone_benchmark_runs_on_both_tower_kinds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_backbones.py", "--models",
                                      "vit_b32_openai,siglip_b16", "--windows", "1",
                                      "--out", str(tmp_path)])
    runpy.run_path(str(REPO / "benchmarks" / "bench_backbones.py"), run_name="__main__")
    rows = json.loads((tmp_path / "bench_backbones.json").read_text())
    assert [r["preset"] for r in rows] == ["vit_b32_openai", "siglip_b16"]
    assert rows[0]["tower"] == "open_clip VisionTransformer"
    assert rows[1]["tower"].startswith("timm VisionTransformer (MAP head)")
    assert all(r["ms_per_window_224"] > 0 and r["native"] == 224 for r in rows)
    assert "siglip_b16" in capsys.readouterr().out
