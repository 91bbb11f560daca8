"""How fast is the evaluation path, and is it still exact? One run, one set of weights.

    python benchmarks/bench_eval.py [--images 4] [--variants 20] [--device cpu] [--precision fp32]
    python benchmarks/bench_eval.py --text-only     # (t) alone
    python benchmarks/bench_eval.py --heavy [--heavy-images 2]   # (h) alone
    python benchmarks/bench_eval.py --proxy [--proxies dino_vitb8,...] # (p) alone

(a) per-image time of our path (windows batched, trunk shared, DataLoader-free here)
    vs a straightforward reference-style loop (one window at a time, batch 1, full-size
    padded accumulation), asserting identical predictions;
(b) 20 Table-2/3 variants: one shared-trunk pass vs 20 separate passes (identical maps);
(c) achieved encoder GFLOP/s vs this machine's dense-matmul GFLOP/s, measured here;
(d) text-embedding time: full 77-token context vs cut after the longest prompt;
(e) the bf16 CPU path (AMX) vs the fp32 reference: time per image and how many predicted
    pixels change (with real weights, run sclip_lab.run twice to see how far mIoU moves);
(t) with --text-only: every benchmark's vocabulary (conf/dataset/*.yaml) × the 80 OpenAI
    templates, (1) each vocabulary alone from scratch, (2) all in a row through one fresh
    cache (names another benchmark already embedded are reused), then the old per-class
    loop vs ours on the smallest vocabulary (--text-baseline, max |Δ| asserted);
(h) with --heavy: COCO-Stuff-sized (640×480, Q=171, short side 448) and ADE20K-sized
    (683×512, Q=150, short side 336) images, random unit queries with the benchmark's
    query→class map and constants: per-image time of the evaluation path
    (``Segmenter.iter_class_maps``), encoder-only time for the same windows (trunk, last
    block, readout; no stitching or post-processing) and their ratio; the same for the
    per-window batch-1 reference loop; class maps asserted equal to ``classes`` of the
    full logits (bit for bit) and to the reference loop (but for float ties).
(p) with --proxy: each proxy backbone's cost per window (ProxyCLIP, ``attention=proxy``)
    beside CLIP ViT-B/16's whole encoder (trunk, last block, readout) on the same windows,
    at 224 and 336 pixels (SCLIP's and ProxyCLIP's windows); random weights.

Weights are a random-init ViT-B/16 (QuickGELU) unless --pretrained names a file or tag;
speed does not depend on the weights. Images are synthetic VOC-sized (375×500) scenes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from sclip_lab import segment
from sclip_lab.data import spec_from_config
from sclip_lab.flops import VIT_B16, vit_encoder_flops
from sclip_lab.model import patch_logits
from sclip_lab.pipeline import Preprocess, build_head, build_segmenter
from sclip_lab.prepare.catalogue import benchmarks, load_section
from sclip_lab.text import TEMPLATE_SETS, classifier, encode_text, query_embeddings, split_queries

VOC_CLASSES = ["sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, "
               "building, cloud, lamp, door, window, wardrobe, ceiling, shelf, curtain, stair, "
               "floor, hill, rail, fence", "aeroplane", "bicycle", "bird", "ship", "bottle",
               "bus", "car", "cat", "chair", "cow", "table", "dog", "horse", "motorbike",
               "person, person in shirt, person in jeans, person in dress, person in sweater, "
               "person in skirt, person in jacket", "pottedplant", "sheep", "sofa", "train",
               "television monitor, tv monitor, monitor, television, screen"]

VARIANTS = (
    [{"attention": {"name": "csa", "temperature": 8.0}, "projection": {"name": p}}
     for p in ("identity", "q", "k", "qk")]
    + [{"attention": {"name": "csa", "temperature": 8.0},
        "projection": {"name": "random", "n": n, "trial": t, "combine": "mean"}}
       for n in (1, 4) for t in range(2)]
    + [{"attention": {"name": "sharpen", "temperature": t}} for t in (8.0, 2.0, 0.5, 0.0)]
    + [{"attention": {"name": "local", "window": k}} for k in (3, 5, 7)]
    + [{"attention": {"name": "early", "layer": n}} for n in (1, 3, 5, 7)]
    + [{"attention": {"name": "csa", "temperature": 8.0}}]
)


def synthetic_images(n: int, seed: int = 0, size: tuple[int, int] = (375, 500)
                     ) -> list[np.ndarray]:
    """``n`` noisy ``size`` RGB scenes with six bright rectangles each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 255, (*size, 3), dtype=np.uint8) // 4
        for _ in range(6):
            y, x = rng.integers(0, size[0] - 75), rng.integers(0, size[1] - 100)
            img[y:y + 120, x:x + 150] += rng.integers(0, 190, 3, dtype=np.uint8)
        out.append(img)
    return out


def timed(fn, *args, repeat: int = 1):
    """(result, best wall time over ``repeat`` calls), GPU work included."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return out, best


@torch.no_grad()
def reference_loop(seg, image: np.ndarray, head) -> torch.Tensor:
    """The reference implementation's shape: one window per forward, F.pad into a
    full-size accumulator, then resize and post-process."""
    x = segment.preprocess(image, seg.prep.short_side)[None].to(seg.device)
    _, _, h, w = x.shape
    preds = torch.zeros(1, seg.queries.shape[0], h, w, device=seg.device)
    count = torch.zeros(1, 1, h, w, device=seg.device)
    for y1, y2, x1, x2 in segment.window_boxes(h, w, seg.prep.window, seg.prep.stride):
        crop = x[:, :, y1:y2, x1:x2]
        feats = seg.encoder(crop, head.last)
        grid = (crop.shape[2] // seg.encoder.patch, crop.shape[3] // seg.encoder.patch)
        logit = F.interpolate(patch_logits(feats, seg.queries, grid), size=(y2 - y1, x2 - x1),
                              mode="bilinear", align_corners=False)
        preds += F.pad(logit, (x1, w - x2, y1, h - y2))
        count[:, :, y1:y2, x1:x2] += 1
    logits = segment.upsample((preds / count)[0], image.shape[:2])
    return reference_classes(logits, seg.post)


def reference_classes(logits: torch.Tensor, post) -> torch.Tensor:
    """The straightforward post-processing (docs/protocol.md §5.9–12): full-size softmax
    over queries, area threshold, first maximal query, probability threshold."""
    probs = torch.softmax(logits.float() * post.logit_scale, dim=0)
    query_class = post.query_class.to(logits.device)
    if post.area_thd is not None:
        areas = torch.bincount(query_class[probs.argmax(0)].flatten(),
                               minlength=post.num_classes)
        small = areas <= post.area_thd * areas[1:].sum()
        small[0] = False
        probs = probs.masked_fill(small[query_class].view(-1, 1, 1), 0.0)
    conf, best = probs.max(0)
    pred = query_class[best]
    return pred.masked_fill(conf < post.prob_thd, 0) if post.prob_thd > 0 else pred


def compare(logits: torch.Tensor, pred: torch.Tensor, other: torch.Tensor, post,
            tol: float = 1e-5) -> tuple[int, int]:
    """(pixels that differ, of those how many are float ties) between two class maps.

    A pixel is a tie when its top-2 class probabilities or its confidence and prob_thd are
    within ``tol``: summing in another order may flip it, as it may between two GPUs.
    """
    diff = pred != other
    probs = segment.class_probabilities(logits, post)
    top = probs.topk(2, dim=0).values
    tie = (top[0] - top[1] < tol) | ((top[0] - post.prob_thd).abs() < tol)
    return int(diff.sum()), int((diff & tie).sum())


def check_same(pairs, post, what: str) -> str:
    """Assert that class maps agree everywhere but at float ties; describe the agreement."""
    total = differ = ties = 0
    for logits, a, b in pairs:
        d, t = compare(logits, a, b, post)
        total, differ, ties = total + a.numel(), differ + d, ties + t
    assert differ == ties, f"{what}: {differ - ties} non-tied pixels changed"
    return f"identical on {total - differ}/{total} pixels, {differ} float ties"


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    _, t = timed(lambda: a @ b, repeat=repeat)
    return 2 * n**3 / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--variants", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--text-only", action="store_true", help="only (t): the text side")
    ap.add_argument("--heavy", action="store_true",
                    help="only (h): COCO-Stuff- and ADE20K-sized cases")
    ap.add_argument("--heavy-images", type=int, default=2, help="(h) images per case")
    ap.add_argument("--proxy", action="store_true", help="only (p): proxy backbones' cost")
    ap.add_argument("--proxies", default="dino_vitb8,dino_vitb16,dinov2_vitb14_reg,mae_vitb16,"
                    "sam_vitb", help="(p) which proxies")
    ap.add_argument("--text-baseline", default="cityscapes",
                    help="(t) vocabulary for the old-loop comparison; 'none' skips it")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.text_only:
            text_side(args, tmp)
        elif args.heavy:
            heavy(args, tmp)
        elif args.proxy:
            proxy_cost(args, tmp)
        else:
            run(args, tmp)


def vocabularies() -> dict[str, list[str]]:
    """benchmark -> its query names, read through the dataset config code."""
    return {b: split_queries(spec_from_config(load_section(b)).classes)[0]
            for b in benchmarks()}


@torch.no_grad()
def per_class_loop(model, tokenizer, names, templates, device) -> torch.Tensor:
    """The old path: one batch of all templates per name, cut at its longest prompt."""
    out = []
    for name in names:
        embs = encode_text(model, tokenizer([t(name) for t in templates]).to(device))
        out.append(F.normalize(F.normalize(embs.float(), dim=-1).mean(0), dim=-1))
    return torch.stack(out)


def text_side(args: argparse.Namespace, tmp: str) -> None:
    """(t): per benchmark queries, prompts encoded, seconds and prompts/s, and the totals."""
    arch, dev = "ViT-B-16-quickgelu", torch.device(args.device)
    model = open_clip.create_model(arch, precision=args.precision, device=dev).eval()
    tok, tmpl = open_clip.get_tokenizer(arch), TEMPLATE_SETS["openai_imagenet"]
    vocab = vocabularies()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}, "
          f"{args.precision}; {arch} text tower (random init) × {len(tmpl)} templates")
    header = f"{'benchmark':<12}{'queries':>8}{'prompts':>9}{'seconds':>9}{'prompts/s':>11}"
    for title, cache in (("(t1) each vocabulary alone, from scratch", None),
                         ("(t2) all in a row, one fresh cache", Path(tmp) / "cache")):
        print(f"{title}\n    {header}")
        seen: set[str] = set()
        total_q = total_p = total_t = 0
        for bench, names in vocab.items():
            fresh = [n for n in dict.fromkeys(names) if cache is None or n not in seen]
            seen.update(names)
            if cache is None:
                _, t = timed(query_embeddings, model, tok, names, tmpl, dev)
            else:
                _, t = timed(classifier, model, arch, names, "openai_imagenet", dev, cache)
            prompts = len(fresh) * len(tmpl)
            total_q, total_p, total_t = total_q + len(names), total_p + prompts, total_t + t
            print(f"    {bench:<12}{len(names):>8}{prompts:>9}{t:>9.1f}{prompts / t:>11.0f}",
                  flush=True)
        print(f"    {'total':<12}{total_q:>8}{total_p:>9}{total_t:>9.1f}"
              f"{total_p / total_t:>11.0f}", flush=True)
    if args.text_baseline != "none":
        names = vocab[args.text_baseline]
        old, t_old = timed(per_class_loop, model, tok, names, tmpl, dev)
        new, t_new = timed(query_embeddings, model, tok, names, tmpl, dev)
        diff = float((old - new).abs().max())
        assert diff < 1e-4, diff
        n = len(names) * len(tmpl)
        print(f"(t3) {args.text_baseline}, {n} prompts: old per-class loop {t_old:.1f} s "
              f"({n / t_old:.0f} prompts/s), ours {t_new:.1f} s ({n / t_new:.0f} prompts/s) "
              f"-> {t_old / t_new:.1f}x; max |Δ| {diff:.1e}")


def weights_file(args: argparse.Namespace, tmp: str) -> str:
    """--pretrained, or one random-init checkpoint file, so every path loads the same."""
    if args.pretrained != "none":
        return args.pretrained
    weights = str(Path(tmp) / "ViT-B-16-random.pt")
    torch.save(open_clip.create_model("ViT-B-16-quickgelu").state_dict(), weights)
    return weights


# (h): benchmark -> a typical image size (H, W)
HEAVY_CASES = {"coco_stuff": (480, 640), "ade20k": (512, 683)}


@torch.no_grad()
def encoder_only(seg, resized) -> None:
    """Our path up to the window logits: batched trunk, last block, readout."""
    seg.window_logits(seg.encode(resized), len(resized), seg.heads[0])


@torch.no_grad()
def encoder_only_batch1(seg, image: np.ndarray) -> None:
    """The reference loop's encoder calls alone: one window per forward, then readout."""
    x = segment.preprocess(image, seg.prep.short_side)[None].to(seg.device)
    for y1, y2, x1, x2 in segment.window_boxes(*x.shape[2:], seg.prep.window, seg.prep.stride):
        crop = x[:, :, y1:y2, x1:x2]
        grid = (crop.shape[2] // seg.encoder.patch, crop.shape[3] // seg.encoder.patch)
        patch_logits(seg.encoder(crop, seg.heads[0].last), seg.queries, grid)


@torch.no_grad()
def full_logits_path(seg, resized: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The evaluation loop before iter_class_maps: a fresh (Q, H, W) logit tensor, then
    the full-size softmax post-processing."""
    return reference_classes(seg.logits_many([resized], [size])[0][0], seg.post)


def heavy_case(seg, name: str, n: int) -> None:
    """(h) one benchmark: its constants and query→class map, random unit queries."""
    section = load_section(name)
    spec = spec_from_config(section)
    _, owner = split_queries(spec.classes)
    short = int(section["short_side"])
    seg.prep = Preprocess(short, 224, 112)
    seg.post = segment.PostProcess(torch.tensor(owner), spec.num_classes, spec.logit_scale,
                                   spec.prob_thd, spec.area_thd)
    gen = torch.Generator().manual_seed(0)
    seg.queries = F.normalize(torch.randn(len(owner), seg.queries.shape[1], generator=gen),
                              dim=-1).to(seg.device)
    images = synthetic_images(n, seed=1, size=HEAVY_CASES[name])
    resized = [segment.preprocess(im, short) for im in images]
    sizes = [im.shape[:2] for im in images]
    with torch.no_grad():  # warm-up on one window: kernels, and the scratch at full size
        next(seg.iter_class_maps([resized[0][:, :224, :224]], sizes[:1]))
        seg.encoder(resized[0][None, :, :224, :224].to(seg.device), seg.heads[0].last)
    # Each path right after its encoder-only twin, image by image: a neighbour's load
    # then slows both sides of a ratio alike.
    preds, t_ours, t_enc, t_full = [], 0.0, 0.0, 0.0
    for r, size in zip(resized, sizes):
        (pred,), t = timed(lambda r=r, size=size: next(seg.iter_class_maps([r], [size])))
        _, t_e = timed(encoder_only, seg, [r])
        _, t_f = timed(full_logits_path, seg, r, size)
        preds, t_ours, t_enc, t_full = preds + [pred], t_ours + t, t_enc + t_e, t_full + t_f
    ref, t_ref = timed(reference_loop, seg, images[0], seg.heads[0])  # slow: one image
    _, t_enc1 = timed(encoder_only_batch1, seg, images[0])
    logits = seg.logits_many(resized, sizes)[0]
    exact = all(torch.equal(p, seg.classes(lg)) for p, lg in zip(preds, logits))
    assert exact, f"(h) {name}: iter_class_maps differs from classes(logits)"
    same = check_same([(logits[0], preds[0], ref)], seg.post, f"(h) {name}")
    h, w = resized[0].shape[1:]
    print(f"(h) {name}: {n} images {w}×{h} -> {sizes[0][1]}×{sizes[0][0]}, "
          f"{len(seg.prep.boxes(h, w))} windows, Q={len(owner)}, C={spec.num_classes}\n"
          f"    ours      {t_ours / n:6.2f} s/image, encoder-only {t_enc / n:6.2f} s -> "
          f"ratio {t_ours / t_enc:.3f}\n"
          f"    full logits + full-size softmax (the loop before iter_class_maps) "
          f"{t_full / n:6.2f} s/image -> ratio {t_full / t_enc:.3f}\n"
          f"    batch-1   {t_ref:6.2f} s/image, encoder-only {t_enc1:6.2f} s -> "
          f"ratio {t_ref / t_enc1:.3f} (first image)\n"
          f"    ours vs batch-1 {t_ref / (t_ours / n):.2f}x; class maps = classes(logits) bit "
          f"for bit; vs batch-1 {same}", flush=True)


def heavy(args: argparse.Namespace, tmp: str) -> None:
    """(h): the heavy benchmarks' post-processing share, one model for both cases."""
    seg, _ = build_segmenter(
        model={"arch": "ViT-B-16-quickgelu", "pretrained": weights_file(args, tmp)},
        attention={"name": "csa", "temperature": 8.0}, projection=None,
        preprocess={"short_side": 336, "window": 224, "stride": 112}, postprocess=None,
        classes=["thing"], logit_scale=40, device=args.device, precision=args.precision,
        batch_size=args.batch_size, cache_dir=None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.precision}; load {os.getloadavg()[0]:.2f}")
    for name in HEAVY_CASES:
        heavy_case(seg, name, args.heavy_images)
    print(f"load {os.getloadavg()[0]:.2f} (1-min average, this run's own threads included)")


def run(args: argparse.Namespace, tmp: str) -> None:
    weights = weights_file(args, tmp)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.precision}")

    seg, info = build_segmenter(
        model={"arch": "ViT-B-16-quickgelu", "pretrained": weights},
        attention={"name": "csa", "temperature": 8.0}, projection=None,
        preprocess={"short_side": 336, "window": 224, "stride": 112}, postprocess=None,
        classes=VOC_CLASSES, logit_scale=65, prob_thd=0.1, area_thd=0.1,
        device=args.device, precision=args.precision, batch_size=args.batch_size,
        cache_dir=None)
    images = synthetic_images(args.images)
    resized = [segment.preprocess(im, 336) for im in images]
    sizes = [im.shape[:2] for im in images]
    # (a) ours vs reference-style loop (both warmed up on one image first)
    head = seg.heads[0]
    seg.logits_many(resized[:1], sizes[:1])
    reference_loop(seg, images[0], head)
    ref, t_ref = timed(lambda: [reference_loop(seg, im, head) for im in images])
    ours_logits, t_ours = timed(lambda: seg.logits_many(resized, sizes)[0])
    ours = [segment.predict_classes(lg, seg.post) for lg in ours_logits]
    same = check_same(zip(ours_logits, ours, ref), seg.post, "(a)")
    n = len(images)
    print(f"(a) per image: reference loop {t_ref / n:.3f} s, ours {t_ours / n:.3f} s "
          f"-> {t_ref / t_ours:.2f}x; predictions {same}")

    # (b) shared trunk for many variants
    enc = seg.encoder
    heads = [build_head(v["attention"], v.get("projection"), None, enc)
             for v in VARIANTS[:args.variants]]
    sub, sub_sizes = resized[:2], sizes[:2]
    shared, t_shared = timed(lambda: seg.logits_many(sub, sub_sizes, heads))
    separate, t_sep = timed(lambda: [seg.logits_many(sub, sub_sizes, [h])[0] for h in heads])
    same = check_same([(x, segment.predict_classes(x, seg.post),
                        segment.predict_classes(y, seg.post))
                       for a, b in zip(shared, separate) for x, y in zip(a, b)], seg.post, "(b)")
    print(f"(b) {len(heads)} variants on {len(sub)} images: separate {t_sep:.2f} s, "
          f"shared trunk {t_shared:.2f} s -> {t_sep / t_shared:.2f}x; predictions {same}")

    # (c) encoder throughput vs dense matmul
    dtype = enc.dtype
    crops = torch.randn(args.batch_size, 3, 224, 224, dtype=dtype, device=args.device)
    with torch.no_grad():
        enc(crops[:2], head.last)
        _, t_enc = timed(lambda: enc(crops, head.last), repeat=2)
    flops = vit_encoder_flops(VIT_B16["width"], VIT_B16["layers"], VIT_B16["heads"],
                              VIT_B16["patch"], 224, 224) * args.batch_size
    enc_gflops = flops / t_enc / 1e9
    mm = matmul_gflops(dtype) if args.device == "cpu" else float("nan")
    print(f"(c) encoder {enc_gflops:.0f} GFLOP/s ({t_enc / args.batch_size * 1e3:.0f} ms per "
          f"224 crop) vs dense matmul {mm:.0f} GFLOP/s -> {enc_gflops / mm:.0%}")

    # (d) text side
    model = open_clip.create_model("ViT-B-16-quickgelu", precision=args.precision,
                                   device=args.device).eval()
    tok = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    names, _ = split_queries(VOC_CLASSES)
    prompts = [t(c) for c in names[:12] for t in TEMPLATE_SETS["openai_imagenet"]]
    tokens = tok(prompts).to(args.device)
    with torch.no_grad():
        full, t_full = timed(lambda: model.encode_text(tokens))
        cut, t_cut = timed(lambda: encode_text(model, tokens))
    diff = (F.normalize(full.float(), dim=-1) - F.normalize(cut.float(), dim=-1)).abs().max()
    print(f"(d) text: {len(prompts)} prompts, full context {t_full:.2f} s, cut at the longest "
          f"prompt ({int(tokens.argmax(-1).max()) + 1} tokens) {t_cut:.2f} s -> "
          f"{t_full / t_cut:.2f}x (max |Δ| {float(diff):.1e})")

    # (e) bf16 vs fp32 on the same weights and queries
    if args.device == "cpu" and args.precision == "fp32":
        low, _ = build_segmenter(
            model={"arch": "ViT-B-16-quickgelu", "pretrained": weights},
            attention={"name": "csa", "temperature": 8.0}, projection=None,
            preprocess={"short_side": 336, "window": 224, "stride": 112}, postprocess=None,
            classes=VOC_CLASSES[:1], logit_scale=65, device="cpu", precision="bf16",
            batch_size=args.batch_size, cache_dir=None)
        low.queries, low.post = seg.queries, seg.post  # same text side
        low.logits_many(resized[:1], sizes[:1])
        low_logits, t_low = timed(lambda: low.logits_many(resized, sizes)[0])
        agree = np.mean([float((segment.predict_classes(lg, seg.post) == ref_pred).float().mean())
                         for lg, ref_pred in zip(low_logits, ours)])
        print(f"(e) bf16: {t_low / n:.3f} s per image vs fp32 {t_ours / n:.3f} s -> "
              f"{t_ours / t_low:.2f}x; {agree:.2%} of predicted pixels unchanged")



@torch.no_grad()
def proxy_cost(args: argparse.Namespace, tmp: str) -> None:
    """(p): seconds per window of each proxy backbone vs CLIP's encoder, batches of 4."""
    import timm

    from sclip_lab.proxy import FAMILIES, ProxyBackbone, ProxySpec

    seg, _ = build_segmenter(
        model={"arch": "ViT-B-16-quickgelu", "pretrained": weights_file(args, tmp)},
        attention={"name": "csa"}, projection=None,
        preprocess={"short_side": 336, "window": 224, "stride": 112}, postprocess=None,
        classes=VOC_CLASSES, logit_scale=65, device=args.device, precision=args.precision,
        cache_dir=None)
    enc, head, dev = seg.encoder, seg.heads[0], seg.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
          f"{args.precision}; seconds per window (batches of 4, best of 2)")
    print(f"  {'backbone':<60}{'224 px':>9}{'336 px':>9}   grid at 336")
    rows = [("CLIP ViT-B/16 (encoder)", lambda x: enc(x, head.last), "21×21")]
    for name in args.proxies.split(","):
        fam = FAMILIES[name]
        spec = ProxySpec(name, fam.arch, "timm", None, fam.patch, input_size=fam.input_size)
        model = timm.create_model(fam.arch, pretrained=False, num_classes=0)
        backbone = ProxyBackbone(spec, model.eval().to(dev, enc.dtype), {})
        g = spec.grid(336, 336)
        rows.append((f"{name} ({fam.arch})", backbone, f"{g[0]}×{g[1]}"))
    for label, fn, grid in rows:
        cells = []
        for size in (224, 336):
            x = torch.randn(4, 3, size, size, device=dev)
            fn(x[:1])
            _, t = timed(fn, x, repeat=2)
            cells.append(t / 4)
        print(f"  {label:<60}{cells[0]:>8.3f}s{cells[1]:>8.3f}s   {grid}")


if __name__ == "__main__":
    main()
