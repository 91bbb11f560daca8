"""Encoder cost per window of every backbone preset (conf/model/), random weights.

    python benchmarks/bench_backbones.py [--models vit_b16_openai,siglip2_b16_256,...]
        [--device cpu] [--precision fp32] [--windows 4] [--out DIR]

For each preset: its dense encoder (trunk, SCLIP's CSA last block, readout; no text side,
stitching or post-processing) on a batch of ``--windows`` windows, at SCLIP's 224 window and
at the backbone's native one (``preprocess=native``), median of 3 timed passes after one
warm-up: ms per window, and the model's size. Speed does not depend on the weights, so
random-init towers give the real cost; building the H/14 towers needs ~8 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sclip_lab.backbones import backbone_facts, presets
from sclip_lab.model import load_clip
from sclip_lab.pipeline import build_last_block
from sclip_lab.timm_tower import dense_encoder


@torch.no_grad()
def ms_per_window(enc, size: int, windows: int, device: str) -> float:
    last = build_last_block({"name": "csa"}, None, enc)
    x = torch.randn(windows, 3, size, size, device=device, dtype=enc.dtype)
    times = []
    for _ in range(4):  # one warm-up, three timed
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        enc.head(enc.trunk_for(x, last), last)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times[1:])[1] / windows


def machine() -> str:
    """The CPU's name and vector ISA as torch detects it, or the GPU's name."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    name = next((line.split(":", 1)[1].strip() for line in
                 (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
                 if line.startswith("model name")), platform.machine())
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(presets()),
                    help="comma-separated preset names (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write bench_backbones.json here")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.device} {args.precision}")
    print(f"{'preset':20s} {'arch':24s} {'tower':28s} {'params':>7s} "
          f"{'224 ms/win':>11s} {'native':>7s} {'ms/win':>8s}")
    for name in args.models.split(","):
        arch, tag = presets()[name]
        facts = backbone_facts(arch, tag)
        model, info = load_clip(arch, "none", args.precision, args.device)
        enc = dense_encoder(model.visual)
        params = sum(p.numel() for p in model.visual.parameters()) / 1e6
        at_224 = ms_per_window(enc, 224, args.windows, info["device"])
        native = facts.image_size
        at_native = at_224 if native == 224 else ms_per_window(enc, native, args.windows,
                                                               info["device"])
        kind = getattr(enc, "kind", "open_clip VisionTransformer")
        rows.append({"preset": name, "arch": arch, "tower": kind, "vision_params_m": params,
                     "ms_per_window_224": at_224, "native": native,
                     "ms_per_window_native": at_native})
        print(f"{name:20s} {arch:24s} {kind[:28]:28s} {params:6.0f}M {at_224:11.1f} "
              f"{native:7d} {at_native:8.1f}", flush=True)
        del model, enc
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_backbones.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
