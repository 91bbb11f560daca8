"""The records room: result keys, summary rows, writing and reading records back."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab import records
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import ConfigError


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("run", overrides=list(overrides)), resolve=True)


def test_result_key_depends_on_results_only():
    base = resolved()
    assert records.result_key(base) == records.result_key(resolved("batch_size=3",
                                                                   "num_workers=7"))
    assert records.result_key(base) != records.result_key(resolved("temperature=4"))
    assert records.result_key(base) != records.result_key(resolved("limit=5"))
    # A plain hash of the result-relevant sections: stable across processes and versions.
    assert records.result_key({"model": 1}) == records.result_key({"model": 1, "seed": 3})
    assert len(records.result_key(base)) == 16


def test_summary_row_fills_the_csa_defaults():
    summary = records.summary_of(resolved(), {"mIoU": 50.0, "aAcc": 80.0, "mAcc": 60.0})
    assert (summary["attention"], summary["projection"], summary["combine"],
            summary["temperature"]) == ("csa", "qk", "sum", 8.0)
    local = records.summary_of(resolved("attention=local", "window=5"), {"mIoU": 1.0})
    assert local["projection"] is None and local["window"] == 5 and local["mAcc"] is None
    rand = records.summary_of(resolved("projection=random", "n=4", "trial=2"), {})
    assert (rand["projection"], rand["n"], rand["trial"]) == ("random", 4, 2)


def test_write_read_resume_and_failures(tmp_path):
    config = resolved()
    key = records.result_key(config)
    run_dir = tmp_path / "sweep" / "voc21"
    records.mark_failed(run_dir, ValueError("first attempt"))
    assert records.failed_jobs(tmp_path) == [(run_dir / records.FAILED_FILE,
                                             "ValueError: first attempt")]
    rec = records.build_record(config, key, {"mIoU": 1.5, "aAcc": 2.0, "mAcc": float("nan")},
                               {"cat": 0.5, "dog": None}, {"arch": "x"}, 3, {"eval_s": 1.0})
    path = records.write_record(run_dir, rec)
    assert not (run_dir / records.FAILED_FILE).exists()  # success drops the stale failure
    back = records.read_record(path)
    assert back["summary"]["mAcc"] is None and back["metrics"]["mIoU"] == 1.5
    assert back["versions"]["torch"] and "git_commit" in back
    assert records.finished_records(tmp_path) == {key: path}
    assert [p for p, _ in records.iter_records(tmp_path)] == [path]
    assert records.summary_row(back)["mIoU"] == 1.5


def test_unfinished_unreadable_and_old_records(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / records.RESULT_FILE).write_text("{not json")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / records.RESULT_FILE).write_text(json.dumps({"status": "running"}))
    assert list(records.iter_records(tmp_path)) == []
    assert "skipping unreadable" in caplog.text
    # An older record without a summary row: the row is derived from its config.
    old = {"status": "finished", "config": resolved("dataset=ade20k"),
           "metrics": {"mIoU": 12.0}}
    row = records.summary_row(old)
    assert row["dataset"] == "ade20k" and row["mIoU"] == 12.0
    assert records.summary_row({"status": "finished", "metrics": {"mIoU": 1}}) is None


def test_resume_root_must_be_a_folder(tmp_path):
    assert records.finished_records(None) == {}
    assert records.finished_records(tmp_path / "missing") == {}
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        records.finished_records(tmp_path / "f")


def test_local_size_rename_keeps_keys_and_rows():
    """``kernel`` is the local attention size; records made when it was called ``window``
    keep their result keys and summary rows."""
    new = resolved("attention=local", "kernel=5")
    assert {k: v for k, v in new["attention"].items() if v is not None} == {"name": "local",
                                                                          "kernel": 5}
    old = {**new, "attention": {"name": "local", "window": 5}}
    assert records.result_key(new) == records.result_key(old)
    assert records.summary_of(old, {})["window"] == records.summary_of(new, {})["window"] == 5
    # the old top-level override still works (with a warning naming kernel=)
    assert resolved("attention=local", "window=7")["attention"]["kernel"] == 7
