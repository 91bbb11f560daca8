"""GPU numbers in one go: precisions against fp32, and a VOC21-val-sized run end to end.

    python benchmarks/bench_gpu.py [--device cuda] [--images 1449] [--workers 8] [--out DIR]

(1) fp16 and bf16 against fp32 on the same weights and queries: images/s of the evaluation
    path (windows batched, trunk shared), peak GPU memory, and how many predicted pixels
    agree with fp32;
(2) ``python -m sclip_lab.run`` on ``--images`` synthetic VOC-sized images written in
    VOC's real layout (a VOC21 val stand-in), with the DataLoader, at ``auto`` precision:
    the wall time of the evaluation as the run records it, after a first run that fills the
    text cache (reported separately).

Weights are a random-init ViT-B/16 (QuickGELU) saved to a file; speed does not depend on
the weights. Runs on CPU too (``--device cpu --images 8``), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from sclip_lab import segment
from sclip_lab.pipeline import build_segmenter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import VOC_CLASSES, synthetic_images  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def segmenter(weights: str, device: str, precision: str, batch: int):
    seg, _ = build_segmenter(
        model={"arch": "ViT-B-16-quickgelu", "pretrained": weights},
        attention={"name": "csa", "temperature": 8.0}, projection=None,
        preprocess={"short_side": 336, "window": 224, "stride": 112}, postprocess=None,
        classes=VOC_CLASSES, logit_scale=65, prob_thd=0.1, area_thd=0.1, device=device,
        precision=precision, batch_size=batch, cache_dir=None)
    return seg


def precisions(weights: str, device: str, n: int, batch: int) -> list[dict]:
    """Per precision: images/s, peak memory, agreement with fp32 (same text queries)."""
    images = synthetic_images(n)
    resized = [segment.preprocess(im, 336) for im in images]
    sizes = [im.shape[:2] for im in images]
    reference, rows = None, []
    for precision in ("fp32", "fp16", "bf16"):
        if device == "cpu" and precision == "fp16":
            continue  # no fast fp16 path on CPU
        seg = segmenter(weights, device, precision, batch)
        if reference is not None:
            seg.queries, seg.post = reference[0].queries, reference[0].post
        seg.logits_many(resized[:2], sizes[:2])  # warm-up (kernels, allocator)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        preds = []
        for i in range(0, n, 8):  # 8 images per call, as images_per_batch=8 would
            for lg in seg.logits_many(resized[i:i + 8], sizes[i:i + 8])[0]:
                preds.append(segment.predict_classes(lg, seg.post).cpu())
        sync(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        if reference is None:
            reference = (seg, preds)
        agree = float(np.mean([(p == r).float().mean().item()
                               for p, r in zip(preds, reference[1])]))
        rows.append({"precision": precision, "images_per_s": n / seconds,
                     "peak_gib": peak, "pixels_as_fp32": agree})
        print(f"(1) {precision}: {n / seconds:.1f} images/s, peak "
              f"{'-' if peak is None else f'{peak:.2f} GiB'}, {agree:.4%} of pixels as fp32",
              flush=True)
        del seg
    return rows


def voc_standin(root: Path, n: int) -> None:
    """``n`` synthetic 500×375 images with label maps in VOC2012's layout (val split)."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [f"2008_{i:06d}" for i in range(n)]
    for i, img in zip(ids, synthetic_images(n)):
        Image.fromarray(img).save(voc / "JPEGImages" / f"{i}.jpg", quality=90)
        label = rng.integers(0, 21, (375 // 25, 500 // 25), dtype=np.uint8)
        label = np.kron(label, np.ones((25, 25), dtype=np.uint8))
        Image.fromarray(label, mode="P").save(voc / "SegmentationClass" / f"{i}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")


def end_to_end(weights: str, device: str, n: int, workers: int, tmp: Path) -> dict:
    """Two ``sclip_lab.run`` calls on the stand-in: the first fills the text cache."""
    data = tmp / "data"
    t0 = time.perf_counter()
    voc_standin(data, n)
    print(f"(2) wrote {n} VOC-sized images in {time.perf_counter() - t0:.0f} s", flush=True)
    base = [sys.executable, "-m", "sclip_lab.run", "model.arch=ViT-B-16-quickgelu",
            f"model.pretrained={weights}", f"data_root={data}", f"device={device}",
            f"num_workers={workers}", "images_per_batch=8", "batch_size=64", "logger=none",
            f"cache_dir={tmp / 'cache'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = {}
    for name in ("first (text cache cold)", "second"):
        run_dir = tmp / name.split()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([*base, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sclip_lab.run failed:\n{proc.stderr[-3000:]}")
        rec = json.loads((run_dir / "result.json").read_text())
        t = rec["timings"]
        out[name] = {"wall_s": wall, **t}
        print(f"(2) {name}: process {wall:.1f} s, setup {t['setup_s']:.1f} s, evaluation "
              f"{t['eval_s']:.1f} s ({n / t['eval_s']:.1f} images/s), "
              f"{rec['model']['precision']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=1449, help="images of the end-to-end run")
    ap.add_argument("--precision-images", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name(), f"torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "ViT-B-16-random.pt")
        torch.save(open_clip.create_model("ViT-B-16-quickgelu").state_dict(), weights)
        result = {"device": args.device,
                  "precisions": precisions(weights, args.device, args.precision_images,
                                           args.batch_size),
                  "end_to_end": end_to_end(weights, args.device, args.images, args.workers,
                                           Path(tmp))}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_gpu.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
