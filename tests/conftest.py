"""Shared fixtures: offline environment, a tiny open_clip ViT, OpenAI-format checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
TINY = "sclip-tiny-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "patch_size": 16,
                   "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_config_file(tmp_path_factory) -> Path:
    """An open_clip model-config JSON for a 4-block, 2-head ViT (registered on creation)."""
    path = tmp_path_factory.mktemp("configs") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return path


def openai_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict as OpenAI's clip package stores it (weights + its metadata buffers)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["input_resolution"] = torch.tensor(224)
    sd["context_length"] = torch.tensor(77)
    sd["vocab_size"] = torch.tensor(49408)
    return sd


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config_file, tmp_path_factory) -> Path:
    """An OpenAI-format state-dict file of the tiny ViT with seeded random weights."""
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-openai.pt"
    torch.save(openai_state_dict(model), path)
    return path


@pytest.fixture(scope="session")
def vitb16_checkpoint(tmp_path_factory) -> Path:
    """A full-size ViT-B/16 OpenAI-format state-dict file (random weights)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu")
    path = tmp_path_factory.mktemp("ckpt") / "ViT-B-16.pt"
    torch.save(openai_state_dict(model), path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from sclip_lab.model import load_clip

    model, _ = load_clip(TINY, str(tiny_checkpoint), "fp32", "cpu")
    return model


@pytest.fixture(scope="session")
def enc(tiny_model):
    """The tiny model's dense encoder."""
    from sclip_lab.model import DenseEncoder

    return DenseEncoder(tiny_model.visual)


@pytest.fixture(scope="session")
def images():
    """Two windows on a non-square 6×7 patch grid, the second rescaled so that per-window
    constants differ (modules that need other pixels define their own)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 96, 112, generator=gen)
    x[1] = 0.3 * x[1] + 0.5
    return x


@pytest.fixture(scope="session")
def queries(enc):
    """Five random unit text embeddings in the tiny model's embedding space."""
    gen = torch.Generator().manual_seed(5)
    return torch.nn.functional.normalize(
        torch.randn(5, enc.visual.proj.shape[1], generator=gen), dim=-1)


def cli(module: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m sclip_lab.<module> overrides...`` offline from the repository root."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"sclip_lab.{module}", *overrides],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def tiny(tiny_config_file, tiny_checkpoint, tmp_path):
    """CLI overrides for the tiny model, a private cache and no DataLoader workers."""
    return [f"model.arch={TINY}", f"model.config_file={tiny_config_file}",
            f"model.pretrained={tiny_checkpoint}", f"cache_dir={tmp_path / 'cache'}",
            "num_workers=0"]


def evaluate_in_process(overrides: list[str], run_dir: Path, config_name: str = "run"):
    """Compose like the CLI and evaluate in this process -> the records (fast path for tests)."""
    from hydra import compose, initialize_config_dir

    from sclip_lab.config import CONF_DIR
    from sclip_lab.run import evaluate, plan_jobs

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
        jobs = plan_jobs(cfg, run_dir, lambda extra: compose(config_name, overrides + extra))
        return evaluate(jobs)


@pytest.fixture()
def tiny_inproc(tiny):
    """``tiny`` overrides for in-process runs (no W&B, no workers)."""
    return [*tiny, "logger=none"]


@pytest.fixture()
def small_fs(tmp_path):
    """A real size-limited filesystem (tmpfs) for disk-full faults: yields a factory
    ``small_fs(kib) -> Path`` of an empty, freshly mounted folder of ``kib`` KiB.

    Needs root (CI runs as root); elsewhere the test is skipped with the reason."""
    if os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs root (mount -t tmpfs); CI runs as root")
    mounts: list[Path] = []

    def make(kib: int) -> Path:
        path = tmp_path / f"fs{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(kib)}k", "tmpfs",
                               str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(path)
        return path

    yield make
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path) -> None:
    """Write zeros into ``folder`` until its filesystem is full (unbuffered, so the last
    write fails here and not at close)."""
    with open(folder / f".filler-{len(list(folder.iterdir()))}", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def with_random_layernorms(enc, seed: int = 5):
    """A copy of an encoder with random LayerNorm gains and biases: with open_clip's init
    (1, 0) every LN1 row has norm √D, so GEM's adaptive τ would be one constant."""
    import copy

    model = copy.deepcopy(enc)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
    return model
