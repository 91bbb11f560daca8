"""What each method costs relative to SCLIP, on the same windows and weights.

    python benchmarks/bench_methods.py [--images 2] [--device cpu] [--precision fp32]

Per method: seconds per image for a full pass (trunk + the method's last block(s) +
stitching), and its ratio to SCLIP's (``attention=csa``); then the marginal cost of each
method when it shares the trunk pass with the others (``variants=``). Weights are a
random-init ViT-B/16 (QuickGELU) unless --pretrained names a file or tag; speed does not
depend on the weights. Images are synthetic VOC-sized (375×500) scenes, VOC21's vocabulary.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from sclip_lab.attention import ATTENTIONS
from sclip_lab.pipeline import Head, build_last_block, build_segmenter

METHODS = [
    ("SCLIP", {"name": "csa", "temperature": 8.0}),
    ("CLIP", {"name": "vanilla"}),
    ("MaskCLIP", {"name": "maskclip"}),
    ("ClearCLIP", {"name": "clearclip"}),
    ("NACLIP", {"name": "naclip", "sigma": 5.0}),
    ("ResCLIP", {"name": "resclip"}),
    ("ResCLIP (RCS only)", {"name": "resclip", "sfr": False}),
    ("CLIP Surgery", {"name": "surgery"}),
    ("GEM", {"name": "gem"}),
    ("GEM (last block)", {"name": "gem_last"}),
    ("CLIPtrase block", {"name": "cliptrase_block"}),
    ("SegEarth-OV block", {"name": "segearth_block"}),
    ("SC-CLIP", {"name": "scclip"}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--pretrained", default="none")
    args = ap.parse_args()
    from bench_eval import VOC_CLASSES, synthetic_images

    torch.manual_seed(0)
    methods = [(label, section) for label, section in METHODS if section["name"] in ATTENTIONS]
    with tempfile.TemporaryDirectory() as tmp:
        seg, info = build_segmenter(
            model={"arch": "ViT-B-16-quickgelu", "pretrained": args.pretrained},
            attention={"name": "csa"}, projection=None,
            preprocess={"short_side": 336, "window": 224, "stride": 112}, postprocess=None,
            classes=VOC_CLASSES, logit_scale=40.0, device=args.device,
            precision=args.precision, cache_dir=tmp)
    heads = [Head(build_last_block(section, None, seg.encoder)) for _, section in methods]
    images = synthetic_images(args.images)
    resized = [seg.prep(im) for im in images]
    sizes = [im.shape[:2] for im in images]
    seg.logits_many(resized[:1], sizes[:1], heads[:1])  # warm-up
    print(f"{info['arch']} {info['precision']} on {info['device']}, {args.images} images "
          f"of {images[0].shape[1]}×{images[0].shape[0]}")
    alone = {}
    for (label, _), head in zip(methods, heads):
        start = time.perf_counter()
        seg.logits_many(resized, sizes, [head])
        alone[label] = (time.perf_counter() - start) / len(images)
    start = time.perf_counter()
    seg.logits_many(resized, sizes, heads)
    shared = (time.perf_counter() - start) / len(images)
    base = alone["SCLIP"]
    print(f"{'method':<20} {'s/image':>8} {'× SCLIP':>8}")
    for label, seconds in alone.items():
        print(f"{label:<20} {seconds:8.2f} {seconds / base:8.2f}")
    print(f"all {len(heads)} in one shared-trunk pass: {shared:.2f} s/image "
          f"({shared / sum(alone.values()):.2f} of separate passes)")


if __name__ == "__main__":
    main()
