"""Resize rule, sliding windows + stitching, post-processing and PAMR (docs/protocol.md §5, §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sclip_lab import refine, segment


@pytest.mark.parametrize("hw,short,expect", [
    ((375, 500), 336, (336, 448)),     # VOC landscape: scale 336/375
    ((500, 333), 336, (505, 336)),     # portrait, rounded half up (504.50 -> 505)
    ((100, 150), 336, (336, 504)),     # small images are upscaled
    ((1024, 2048), 560, (560, 1120)),  # Cityscapes
    ((300, 3000), 336, (205, 2048)),   # long side capped at 2048
])
def test_mmcv_resize_rule(hw, short, expect):
    assert segment.resized_shape(*hw, short) == expect
    img = np.zeros((*hw, 3), np.uint8)
    assert segment.resize_image(img, short).shape[:2] == expect


def reference_windows(h, w, crop, stride):
    """Direct transcription of mmseg's slide_inference loop."""
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out.append((y1, y2, x1, x2))
    return out


@pytest.mark.parametrize("h,w,crop,stride", [(336, 448, 224, 112), (336, 504, 224, 112),
                                              (200, 300, 224, 112), (448, 597, 448, 224),
                                              (224, 224, 224, 112)])
def test_window_boxes(h, w, crop, stride):
    boxes = segment.window_boxes(h, w, crop, stride)
    assert boxes == reference_windows(h, w, crop, stride)
    assert all(y2 <= h and x2 <= w and y1 >= 0 and x1 >= 0 for y1, y2, x1, x2 in boxes)


@pytest.mark.parametrize("h,w,crop,stride", [(250, 330, 224, 112), (336, 448, 224, 112),
                                              (200, 300, 224, 112), (448, 597, 448, 224)])
def test_stitch_windows_is_upsample_pad_and_average(h, w, crop, stride):
    torch.manual_seed(0)
    boxes = reference_windows(h, w, crop, stride)
    windows = {box: torch.randn(4, (box[1] - box[0]) // 16, (box[3] - box[2]) // 16)
               for box in boxes}
    acc = torch.zeros(4, h, w)
    cnt = torch.zeros(1, h, w)
    for (y1, y2, x1, x2), low in windows.items():
        up = F.interpolate(low[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                           align_corners=False)[0]
        acc += F.pad(up, (x1, w - x2, y1, h - y2))
        cnt[:, y1:y2, x1:x2] += 1
    torch.testing.assert_close(segment.stitch_windows(windows, h, w), acc / cnt, rtol=1e-5,
                               atol=1e-5)
    for size in [(h + 39, w + 52), (h - 17, w - 3)]:  # the final resize, up or down
        ref = F.interpolate((acc / cnt)[None], size=size, mode="bilinear",
                            align_corners=False)[0]
        torch.testing.assert_close(segment.stitch_windows(windows, h, w, size), ref,
                                   rtol=1e-5, atol=1e-5)


def test_normalize_constants():
    img = np.full((2, 2, 3), (122, 117, 104), np.uint8)
    x = segment.normalize(img)
    expect = (torch.tensor([122, 117, 104.0]) - torch.tensor(segment.PIXEL_MEAN)) / torch.tensor(
        segment.PIXEL_STD)
    torch.testing.assert_close(x[:, 0, 0], expect)


def pp(query_class, C, scale=1.0, prob=0.0, area=None):
    return segment.PostProcess(torch.tensor(query_class), C, scale, prob, area)


def test_synonym_max_over_softmax_of_all_queries():
    logits = torch.randn(5, 3, 4)
    owner = [0, 0, 1, 2, 2]
    probs = segment.class_probabilities(logits, pp(owner, 3, scale=40))
    soft = torch.softmax(logits * 40, 0)
    expect = torch.stack([soft[0:2].amax(0), soft[2], soft[3:5].amax(0)])
    torch.testing.assert_close(probs, expect)


def reference_predict(logits, pp_):
    """docs/protocol.md §5.9–12 written out on class probabilities."""
    probs = segment.class_probabilities(logits, pp_)
    if pp_.area_thd is not None:
        pred = probs.argmax(0)
        areas = torch.bincount(pred.flatten(), minlength=pp_.num_classes)
        for c in range(1, pp_.num_classes):
            if areas[c] <= pp_.area_thd * areas[1:].sum():
                probs[c] = 0
    conf, pred = probs.max(0)
    if pp_.prob_thd > 0:
        pred[conf < pp_.prob_thd] = 0
    return pred


@pytest.mark.parametrize("prob,area", [(0.0, None), (0.1, 0.1), (0.3, 0.2), (0.0, 0.05)])
def test_predict_classes_matches_class_level_definition(prob, area):
    torch.manual_seed(1)
    owner = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5]
    logits = torch.randn(len(owner), 40, 50) * 0.05
    logits[4, :10] += 0.2   # a small region of class 2
    logits[:, :5, :5] = 0.3  # exact ties everywhere in a corner
    p = pp(owner, 6, scale=40, prob=prob, area=area)
    assert torch.equal(segment.predict_classes(logits, p), reference_predict(logits, p))


@pytest.mark.parametrize("prob,area", [(0.0, None), (0.1, 0.1), (0.3, 0.2), (0.0, 0.05)])
def test_a_sigmoid_head_follows_the_same_definition_on_its_probabilities(prob, area):
    """text.scores=sigmoid: §5.9–12 on sigmoid(scale·logit + bias) per query, written out
    independently here (no segment.query_probabilities)."""
    torch.manual_seed(2)
    owner = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5]
    logits = torch.randn(len(owner), 40, 50) * 0.1
    logits[4, :10] += 0.2
    p = segment.PostProcess(torch.tensor(owner), 6, 40.0, prob, area, sigmoid=(20.0, -1.0))
    probs = segment.synonym_max(torch.sigmoid(logits * 20.0 - 1.0), p.query_class, 6)
    if area is not None:
        areas = torch.bincount(probs.argmax(0).flatten(), minlength=6)
        small = areas <= area * areas[1:].sum()
        small[0] = False
        probs[small] = 0
    conf, want = probs.max(0)
    if prob > 0:
        want[conf < prob] = 0
    assert torch.equal(segment.predict_classes(logits, p), want)


def test_a_saturated_sigmoid_ties_to_the_lowest_query_where_logits_differ():
    """sigmoid(60) and sigmoid(80) are both 1.0 in fp32: the class map is the argmax of the
    probabilities as computed (query 0), not of the logits (query 1)."""
    logits = torch.tensor([[[3.0]], [[4.0]]])
    p = segment.PostProcess(torch.arange(2), 2, 40.0, sigmoid=(20.0, 0.0))
    assert segment.predict_classes(logits, p).item() == 0
    assert segment.predict_classes(logits, segment.PostProcess(torch.arange(2), 2, 40.0)
                                   ).item() == 1
    # an absolute threshold: every query unlikely -> background, though one is the largest
    p = segment.PostProcess(torch.arange(3), 3, 40.0, 0.5, sigmoid=(10.0, -10.0))
    assert segment.predict_classes(torch.tensor([[[0.1]], [[0.5]], [[0.2]]]), p).item() == 0


def test_ties_go_to_lowest_index():
    logits = torch.zeros(3, 2, 2)
    assert segment.predict_classes(logits, pp([0, 1, 2], 3)).eq(0).all()
    logits[1:] = 1.0
    assert segment.predict_classes(logits, pp([0, 1, 2], 3)).eq(1).all()


def test_prob_thd_sets_background():
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 5.0]], [[0.0, 0.0]]])
    pred = segment.predict_classes(logits, pp([0, 1, 2], 3, prob=0.5))
    # pixel 0: uniform (max 1/3 < 0.5) -> 0 ; pixel 1: confident class 1
    assert pred.tolist() == [[0, 1]]


def test_area_thd_drops_small_classes():
    H, W = 10, 10
    logits = torch.zeros(3, H, W)
    logits[1, :, :9] = 5.0   # class 1: 90 pixels
    logits[2, :, 9] = 5.0    # class 2: 10 pixels = 10% of foreground
    logits[1, :, 9] = 4.0    # runner-up on class 2's pixels
    pred = segment.predict_classes(logits, pp([0, 1, 2], 3, area=0.1))
    # 10 <= 0.1 * 100 -> class 2 zeroed; its pixels go to the next best class (1)
    assert (pred == 1).all()
    pred = segment.predict_classes(logits, pp([0, 1, 2], 3, area=0.05))
    assert (pred[:, 9] == 2).all()


def pre_fusion_predict(logits, pp_):
    """The implementation before block-wise post-processing, verbatim: full-size softmax,
    area threshold, first maximal query, probability threshold."""
    query_class = pp_.query_class.to(logits.device)
    probs = torch.softmax(logits.float() * pp_.logit_scale, dim=0)
    if pp_.area_thd is not None:
        pred = query_class[probs.argmax(0)]
        areas = torch.bincount(pred.flatten(), minlength=pp_.num_classes)
        small = areas <= pp_.area_thd * areas[1:].sum()
        small[0] = False
        probs = probs.masked_fill(small[query_class].view(-1, 1, 1), 0.0)
    conf, best = probs.max(0)
    pred = query_class[best]
    if pp_.prob_thd > 0:
        pred = pred.masked_fill(conf < pp_.prob_thd, 0)
    return pred


def tied_logits(q, h, w, seed, scale=0.1):
    """Random logits with every kind of tie planted: exact copies of the top query (same
    class and other classes), neighbours one ulp away, gaps that only the logit scale's
    rounding closes, and constant regions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(q, h, w, generator=gen) * scale
    top = x.argmax(0)
    other = torch.randint(0, q, (h, w), generator=gen)
    val = x.gather(0, top[None])[0]
    for make in (lambda v: v,                                      # exact tie
                 lambda v: torch.nextafter(v, torch.tensor(-1.0)),  # one ulp below
                 lambda v: torch.nextafter(v, torch.tensor(1.0)),   # one ulp above
                 lambda v: v - 3e-9, lambda v: v - 1e-7):           # below fp32 / scale reach
        m = torch.rand(h, w, generator=gen) < 0.1
        ys, xs = m.nonzero(as_tuple=True)
        x[other[m], ys, xs] = make(val[m])
    x[:, : h // 5, : w // 5] = 0.25  # every query equal
    return x


@pytest.mark.parametrize("q,h,w,owner_seed", [(171, 61, 83, None), (150, 40, 97, None),
                                               (12, 33, 50, 3), (40, 70, 45, 4)])
@pytest.mark.parametrize("scale", [40.0, 65.0, 1.0])
@pytest.mark.parametrize("chunk", [None, 2000])
def test_predict_classes_equals_the_pre_fusion_implementation(q, h, w, owner_seed, scale,
                                                              chunk, monkeypatch):
    """Bit-identical class maps, ties included (lowest index wins), in one block or many."""
    if chunk:
        monkeypatch.setattr(segment, "CHUNK_ELEMENTS", chunk)
    owner = list(range(q)) if owner_seed is None else sorted(
        np.random.default_rng(owner_seed).integers(0, q // 3, q).tolist())
    owner[0] = 0
    C = max(owner) + 1
    logits = tied_logits(q, h, w, seed=q + h)
    for prob, area in [(0.0, None), (0.1, None), (0.0, 0.1), (0.1, 0.1), (0.3, 0.05)]:
        p = pp(owner, C, scale=scale, prob=prob, area=area)
        assert torch.equal(segment.predict_classes(logits, p), pre_fusion_predict(logits, p))


@pytest.mark.parametrize("scale", [1.0, 40.0, 100.0])
def test_first_max_query_is_the_softmax_argmax(scale):
    """Without thresholds no softmax is computed, yet the first maximal probability's query
    comes out, including where rounding makes distinct logits equally probable."""
    x = tied_logits(64, 50, 70, seed=7, scale=0.5)
    _, want = segment.softmax_best(x, scale)
    assert torch.equal(segment.first_max_query(x, scale), want)
    flat = x.flatten(1)
    assert torch.equal(segment.first_max_query(flat, scale), want.flatten())


def test_row_chunks_cover_every_row_once():
    for q, h, w, budget in [(171, 480, 640, None), (3, 7, 5, 20), (2, 5, 100, 1)]:
        chunks = segment.row_chunks(q, h, w, budget)
        assert [r for c in chunks for r in range(h)[c]] == list(range(h))
    assert len(segment.row_chunks(171, 480, 640)) > 1  # COCO-Stuff: never all at once


def test_stitch_into_scratch_is_the_same_product():
    torch.manual_seed(2)
    boxes = reference_windows(250, 330, 224, 112)
    windows = {b: torch.randn(6, (b[1] - b[0]) // 16, (b[3] - b[2]) // 16) for b in boxes}
    scratch = torch.full((6 * 300 * 400 + 7,), float("nan"))
    for size in [(250, 330), (300, 400), (120, 97)]:
        fresh = segment.stitch_windows(windows, 250, 330, size)
        into = segment.stitch_windows(windows, 250, 330, size, out=scratch)
        assert torch.equal(into, fresh) and into.data_ptr() == scratch.data_ptr()


def reference_pamr(img, mask, steps, dilations):
    """Transcription of PAMR with explicit 3×3 dilated kernels via conv2d (docs/protocol.md §7)."""
    def shifts(x, d, with_centre):
        K = x.shape[1]
        ws = []
        for i in range(3):
            for j in range(3):
                if (i, j) == (1, 1) and not with_centre:
                    continue
                w = torch.zeros(1, 1, 3, 3)
                w[0, 0, i, j] = 1
                ws.append(w)
        weight = torch.cat(ws)  # (P, 1, 3, 3)
        xs = F.pad(x.reshape(-1, 1, *x.shape[-2:]), [d] * 4, mode="replicate")
        out = F.conv2d(xs, weight, dilation=d)
        return out.view(x.shape[0], K, -1, *x.shape[-2:])

    std = torch.cat([shifts(img, d, True) for d in dilations], 2).std(2, keepdim=True)
    diff = torch.cat([(img.unsqueeze(2) - shifts(img, d, False)).abs() for d in dilations], 2)
    aff = (-diff / (1e-8 + 0.1 * std)).mean(1, keepdim=True).softmax(2)
    for _ in range(steps):
        mask = (torch.cat([shifts(mask, d, False) for d in dilations], 2) * aff).sum(2)
    return mask


def test_pamr_matches_transcription():
    torch.manual_seed(0)
    img = torch.randn(3, 23, 31)
    logits = torch.randn(4, 23, 31)
    ours = refine.pamr(img, logits, steps=3, dilations=(1, 2))
    ref = reference_pamr(img[None], logits[None], 3, (1, 2))[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # a constant map is a fixed point (weights sum to one)
    const = torch.ones(2, 23, 31)
    torch.testing.assert_close(refine.pamr(img, const, 5, (8, 16)), const)


# ------------------------------------------------- row-block stitching (predict at any size)


def tied_windows(boxes, q, seed, grid=16):
    """Window logits ``(q, gh, gw)`` per box with ties planted before stitching: query 2
    copies query 0 in every window, query q-1 copies query 1 in half of them, and one
    window holds every query equal."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, (y1, y2, x1, x2) in enumerate(boxes):
        low = torch.randn(q, (y2 - y1) // grid, (x2 - x1) // grid, generator=gen) * 0.1
        low[2] = low[0]
        if n % 2:
            low[q - 1] = low[1]
        if n == len(boxes) // 2:
            low[:] = 0.2
        out[(y1, y2, x1, x2)] = low
    return out


# (resized h, w, window, stride, original size): several windows and a resize up; a
# non-square downsize; a whole-image window; a portrait with the identity resize.
LAYOUTS = [(168, 224, 112, 56, (187, 250)), (125, 165, 112, 56, (60, 49)),
           (112, 150, 224, 112, (151, 201)), (224, 168, 112, 56, (224, 168))]


@pytest.mark.parametrize("h,w,crop,stride,size", LAYOUTS)
def test_one_stitch_block_is_stitch_windows_bit_for_bit(h, w, crop, stride, size):
    windows = tied_windows(segment.window_boxes(h, w, crop, stride), 21, seed=h + w)
    blocks = list(segment.stitch_blocks(windows, h, w, size))
    assert len(blocks) == 1 and blocks[0][0] == slice(0, size[0])
    assert torch.equal(blocks[0][1], segment.stitch_windows(windows, h, w, size))


@pytest.mark.parametrize("h,w,crop,stride,size", LAYOUTS)
@pytest.mark.parametrize("parts", [3, 10])  # block edges inside the windows
def test_stitched_class_maps_equal_the_full_size_path(h, w, crop, stride, size, parts,
                                                      monkeypatch):
    """predict's path (stitch and reduce in row blocks) gives the class map of the
    full-size logits on every pixel, ties (lowest index), synonyms and thresholds
    included, and never holds more than one block of logits."""
    owner = [0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 10, 11, 12, 13, 14, 15]
    budget = len(owner) * size[0] * size[1] // parts
    monkeypatch.setattr(segment, "CHUNK_ELEMENTS", budget // 4)
    monkeypatch.setattr(segment, "STITCH_ELEMENTS", budget)
    windows = tied_windows(segment.window_boxes(h, w, crop, stride), len(owner), seed=h)
    full = segment.stitch_windows(windows, h, w, size)
    blocks = [(rows, b.clone()) for rows, b in segment.stitch_blocks(windows, h, w, size)]
    chunk_starts = {c.start for c in segment.row_chunks(*full.shape)}
    assert len(blocks) > 2 and all(b.numel() <= budget for _, b in blocks)
    assert [r for rows, _ in blocks for r in range(size[0])[rows]] == list(range(size[0]))
    assert {rows.start for rows, _ in blocks} <= chunk_starts  # whole reduction chunks
    torch.testing.assert_close(torch.cat([b for _, b in blocks], 1), full, rtol=0, atol=1e-6)
    for scale, prob, area in [(40.0, 0.0, None), (65.0, 0.1, None), (40.0, 0.2, 0.05)]:
        p = pp(owner, max(owner) + 1, scale=scale, prob=prob, area=area)
        want = pre_fusion_predict(full, p)
        assert torch.equal(segment.classes_of_blocks(
            lambda: segment.stitch_blocks(windows, h, w, size), tuple(full.shape), p), want)


def test_stitch_blocks_bound_the_memory_of_a_large_image(monkeypatch):
    """A 1200×900 image of 21 queries under an 8 M-logit budget (two reduction chunks):
    no block comes near the (Q, H, W) size."""
    monkeypatch.setattr(segment, "STITCH_ELEMENTS", 1 << 23)
    windows = tied_windows(segment.window_boxes(336, 448, 224, 112), 21, seed=5)
    sizes = [b.numel() for _, b in segment.stitch_blocks(windows, 336, 448, (900, 1200))]
    assert sum(sizes) == 21 * 900 * 1200 and max(sizes) <= 1 << 23 and len(sizes) == 3
