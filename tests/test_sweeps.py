"""Sweeps: definitions compose, the resume key, launchers, resume after a kill, tables."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cli
from hydra import compose, initialize_config_dir
from synthetic import write_benchmark

from sclip_lab.config import CONF_DIR
from sclip_lab.records import result_key

TABLE_DATASETS = ("voc21", "context59", "coco_stuff")


@pytest.mark.parametrize("table,jobs,variants", [("table1", 8, 6), ("table2", 3, 20),
                                                 ("table3", 3, 12), ("table4", 15, 0),
                                                 ("clearclip_grid", 5, 20),
                                                 ("naclip_grid", 8, 10),
                                                 ("methods", 8, 19)])
def test_sweep_definitions_compose(table, jobs, variants):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[f"+sweep={table}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    n_jobs = 1
    for values in params.values():
        n_jobs *= len(str(values).split(","))
    assert n_jobs == jobs
    assert len(cfg.variants or []) == variants
    assert cfg.sweep.table == table


def test_every_variant_of_every_sweep_composes():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for table in ("table1", "table2", "table3", "clearclip_grid", "naclip_grid",
                      "methods"):
            cfg = compose("run", overrides=[f"+sweep={table}"])
            for entry in cfg.variants:
                vcfg = compose("run", overrides=[f"protocol={cfg.protocol.name}",
                                                 *entry.split()])
                assert vcfg.attention.name


def test_result_key_ignores_speed_and_paths_but_not_science():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = compose("run", overrides=["attention=csa", "projection=random", "n=4"])
        fast = compose("run", overrides=["attention=csa", "projection=random", "n=4",
                                         "batch_size=2", "num_workers=0", "logger=none",
                                         "data_root=/elsewhere", "cache_dir=/tmp/x"])
        other = compose("run", overrides=["attention=csa", "projection=random", "n=16"])
        knob = compose("run", overrides=["attention=vanilla", "n=16"])  # unused knob
        vanilla = compose("run", overrides=["attention=vanilla"])
    from omegaconf import OmegaConf

    def key(c):
        return result_key(OmegaConf.to_container(c, resolve=True))

    assert key(base) == key(fast)
    assert key(base) != key(other)
    assert key(knob) == key(vanilla)


def _records(root):
    return {p.relative_to(root): json.loads(p.read_text()) for p in root.rglob("result.json")}


@pytest.mark.e2e
def test_sweep_resumes_after_a_kill_and_tables_rebuild(tiny, tmp_path):
    data = tmp_path / "data"
    for name in TABLE_DATASETS[:2]:
        write_benchmark(data, name, num_images=1, size=(64, 64))
    sweeps = tmp_path / "sweeps"
    args = ["-m", "+sweep=table3", *tiny, f"data_root={data}", "logger=none",
            "hydra.sweeper.params.dataset='voc21,context59'",
            "variants=['attention=sharpen temperature=8','attention=local window=3',"
            "'attention=csa']"]
    env = {"SCLIP_SWEEPS": str(sweeps)}
    first = cli("run", *args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    recs = _records(sweeps)
    assert len(recs) == 6
    assert {r["sweep"]["table"] for r in recs.values()} == {"table3"}
    # "kill": one job's variant never finished
    lost = next(p for p in recs if "local" in str(p) and "context59" in str(p))
    (sweeps / lost).unlink()
    mtimes = {p: (sweeps / p).stat().st_mtime_ns for p in recs if p != lost}
    again = cli("run", *args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    after = _records(sweeps)
    assert len(after) == 6
    assert all((sweeps / p).stat().st_mtime_ns == t for p, t in mtimes.items())
    assert after[lost]["metrics"] == recs[lost]["metrics"]
    out1, out2 = tmp_path / "t1", tmp_path / "t2"
    for out in (out1, out2):
        proc = subprocess.run([sys.executable, "analysis/make_tables.py", "--root", str(sweeps),
                               "--out", str(out), "--tables", "3"], cwd=CONF_DIR.parent,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out1 / "table3.csv").read_text() == (out2 / "table3.csv").read_text()
    assert (out1 / "table3.tex").is_file() and (out1 / "table3.png").is_file()
    import pandas as pd

    csv = pd.read_csv(out1 / "table3.csv", index_col=0)
    assert csv["coco_stuff_mean"].isna().all()  # coco_stuff and most rows were not run
    assert (csv["coco_stuff_k"] == 0).all() and csv.filter(like="_mean").isna().any().all()


@pytest.mark.e2e
def test_submitit_local_launcher_smoke(tiny, tmp_path):
    data = tmp_path / "data"
    write_benchmark(data, "voc21", num_images=1, size=(64, 64))
    sweeps = tmp_path / "sweeps"
    proc = cli("run", "-m", "+sweep=table4", "hydra/launcher=local", *tiny,
               f"data_root={data}", "logger=none", "num_threads=1",
               "hydra.sweeper.params.dataset=voc21",
               "hydra.sweeper.params.preprocess='mode1,mode5'",
               env={"SCLIP_SWEEPS": str(sweeps)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(sweeps)
    assert sorted((r["summary"]["short_side"], r["summary"]["crop"]) for r in recs.values()) == [
        (224, 224), (448, 448)]
    assert list(sweeps.rglob(".submitit"))
    out = tmp_path / "tables"
    proc = subprocess.run([sys.executable, "analysis/make_tables.py", "--root", str(sweeps),
                           "--out", str(out), "--tables", "4"], cwd=CONF_DIR.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all((out / f"table4.{ext}").is_file() for ext in ("csv", "tex", "png", "pdf"))


@pytest.mark.e2e
def test_failed_job_does_not_stop_the_sweep(tiny, tmp_path):
    data = tmp_path / "data"
    write_benchmark(data, "voc21", num_images=1, size=(64, 64))  # context59 missing
    sweeps = tmp_path / "sweeps"
    args = ["run", "-m", "+sweep=table3", *tiny, f"data_root={data}", "logger=none",
            "hydra.sweeper.params.dataset='context59,voc21'", "variants=['attention=csa']"]
    proc = cli(*args, env={"SCLIP_SWEEPS": str(sweeps)})
    # The other job finished; the sweep still says that one failed, and where.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 job(s)/variant(s) of this sweep failed" in proc.stderr
    failed = list(sweeps.rglob("failed.json"))
    assert [f.parent.name for f in failed] == ["context59"]
    assert str(failed[0].parent) in proc.stderr
    assert len(_records(sweeps)) == 1
    # Once the data is there, relaunching finishes the failed job, skips the finished one
    # and drops the stale failed.json: the sweep exits 0.
    write_benchmark(data, "context59", num_images=1, size=(64, 64))
    proc = cli(*args, env={"SCLIP_SWEEPS": str(sweeps)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skip [csa]" in proc.stdout + proc.stderr  # the variant's full label
    assert not list(sweeps.rglob("failed.json"))
    assert len(_records(sweeps)) == 2


def test_slurm_launcher_preset_composes():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=["+sweep=table2", "hydra/launcher=slurm",
                                         "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.array_parallelism == 16 and launcher.max_num_timeout == 2


@pytest.mark.e2e
@pytest.mark.parametrize("grid,dataset,protocol", [("clearclip_grid", "voc20", "clearclip"),
                                                   ("naclip_grid", "voc21", "naclip")])
def test_method_grids_run_as_sweeps_and_render_as_tables(tiny, tmp_path, grid, dataset,
                                                         protocol):
    """Every variant of a method's grid runs under that method's protocol in one job and
    fills its column of the grid's table; the other benchmarks stay empty."""
    data = tmp_path / "data"
    write_benchmark(data, dataset, num_images=1, size=(48, 64))
    sweeps = tmp_path / "sweeps"
    proc = cli("run", "-m", f"+sweep={grid}", *tiny, f"data_root={data}", "logger=none",
               f"hydra.sweeper.params.dataset={dataset}", env={"SCLIP_SWEEPS": str(sweeps)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = list(_records(sweeps).values())
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        n_variants = len(compose("run", overrides=[f"+sweep={grid}"]).variants)
    assert len(recs) == n_variants
    assert {r["summary"]["protocol"] for r in recs} == {protocol}
    assert {r["config"]["protocol"]["name"] for r in recs} == {protocol}
    out = tmp_path / "tables"
    proc = subprocess.run([sys.executable, "analysis/make_tables.py", "--root", str(sweeps),
                           "--out", str(out), "--tables", grid], cwd=CONF_DIR.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pandas as pd

    csv = pd.read_csv(out / f"{grid}.csv", index_col=0)
    reproduced = csv[f"{dataset}_mean"]
    assert len(reproduced) == n_variants and reproduced.notna().all(), reproduced
    assert (csv[f"{dataset}_k"] == 1).all() and not csv[f"{dataset}_partial"].any()
    others = [c for c in csv.columns if c.endswith("_mean") and c != f"{dataset}_mean"]
    assert others and all(csv[c].isna().all() for c in others)
    assert (out / f"{grid}.tex").is_file() and (out / f"{grid}.png").is_file()


@pytest.mark.e2e
def test_methods_leaderboard_runs_every_method_and_renders(tmp_path, tmp_path_factory):
    """Every method of the leaderboard on one benchmark, one shared trunk pass, on a
    12-block tiny ViT (deep enough for every method's default blocks); ProxyCLIP with a
    random-init DINO ViT-B/8 file."""
    import open_clip
    import timm
    import torch
    from conftest import TINY_CONFIG, openai_state_dict

    config = json.loads(json.dumps(TINY_CONFIG))
    config["vision_cfg"].update(layers=12, width=64)
    path = tmp_path_factory.mktemp("deep") / "sclip-deep-tiny.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    ckpt = path.with_suffix(".pt")
    torch.save(openai_state_dict(open_clip.create_model("sclip-deep-tiny")), ckpt)
    dino = path.with_name("dino_vitbase8_pretrain.pth")
    torch.save(timm.create_model("vit_base_patch8_224.dino", num_classes=0).state_dict(), dino)
    data = tmp_path / "data"
    write_benchmark(data, "voc20", num_images=1, size=(48, 64))
    sweeps = tmp_path / "sweeps"
    proc = cli("run", "-m", "+sweep=methods", "model.arch=sclip-deep-tiny",
               f"model.config_file={path}", f"model.pretrained={ckpt}", f"proxy.pretrained={dino}",
               f"cache_dir={tmp_path / 'cache'}", "num_workers=0", f"data_root={data}",
               "logger=none", "hydra.sweeper.params.dataset=voc20",
               env={"SCLIP_SWEEPS": str(sweeps)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = list(_records(sweeps).values())
    assert len(recs) == 19
    assert {r["summary"]["attention"] for r in recs} >= {
        "surgery", "gem", "resclip", "segearth_block", "scclip", "sfp", "pearl", "proxy"}
    out = tmp_path / "tables"
    proc = subprocess.run([sys.executable, "analysis/make_tables.py", "--root", str(sweeps),
                           "--out", str(out), "--tables", "methods"], cwd=CONF_DIR.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pandas as pd

    csv = pd.read_csv(out / "methods.csv", index_col=0)
    assert csv["voc20_mean"].notna().all() and csv["ade20k_mean"].isna().all()
    assert csv.loc["NACLIP", "voc20_paper"] == pytest.approx(79.7, rel=0.0, abs=1e-9)
    assert csv.loc["ProxyCLIP (DINO ViT-B/8)", "voc20_paper"] == pytest.approx(80.3, rel=0.0,
                                                                            abs=1e-9)
