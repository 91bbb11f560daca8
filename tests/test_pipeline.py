"""The shared-trunk engine: several heads and images in one pass change no prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY

from sclip_lab import segment
from sclip_lab.pipeline import Segmenter, build_head, build_segmenter


def test_shared_trunk_and_image_batching_equal_separate_passes(tiny_checkpoint, tmp_path):
    seg, _ = build_segmenter(
        model={"arch": TINY, "pretrained": str(tiny_checkpoint)},
        attention={"name": "csa", "temperature": 8.0}, projection=None,
        preprocess={"short_side": 96, "window": 64, "stride": 32}, postprocess=None,
        classes=["sky, cloud", "cat", "dog", "grass"], logit_scale=40, prob_thd=0.1,
        area_thd=0.1, device="cpu", precision="fp32", batch_size=5, cache_dir=None)
    enc = seg.encoder
    seg.heads += [build_head({"name": "early", "layer": 2}, None, None, enc),
                  build_head({"name": "local", "window": 3}, None, {"name": "pamr", "steps": 2,
                                                                     "dilations": [1, 2]}, enc),
                  build_head({"name": "csa"}, {"name": "random", "n": 2, "trial": 1}, None, enc)]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in
              [(90, 130), (60, 61), (150, 100)]]
    resized = [segment.preprocess(im, 96) for im in images]
    sizes = [im.shape[:2] for im in images]
    together = seg.logits_many(resized, sizes)
    for h, head in enumerate(seg.heads):
        for i in range(len(images)):
            alone = seg.logits_many([resized[i]], [sizes[i]], [head])[0][0]
            torch.testing.assert_close(together[h][i], alone, rtol=1e-5, atol=1e-5)
            assert torch.equal(segment.predict_classes(together[h][i], seg.post),
                               segment.predict_classes(alone, seg.post))
    seg.batch_size = 1  # batch size never changes the result
    single = seg.logits_many(resized, sizes)
    for a, b in zip(together, single):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_class_maps_equal_classes_of_the_full_logits(tiny_checkpoint, monkeypatch):
    """The evaluation path (iter_class_maps: logits into a reused scratch, reduced block
    by block) gives ``classes(iter_heads(...))`` bit for bit, PAMR head included, and
    the pre-fusion full-size post-processing's maps."""
    from test_segment import pre_fusion_predict

    seg, _ = build_segmenter(
        model={"arch": TINY, "pretrained": str(tiny_checkpoint)},
        attention={"name": "csa", "temperature": 8.0}, projection=None,
        preprocess={"short_side": 96, "window": 64, "stride": 32}, postprocess=None,
        classes=["sky, cloud", "cat", "dog", "grass, lawn, field"], logit_scale=40,
        device="cpu", precision="fp32", batch_size=3, cache_dir=None)
    seg.heads.append(build_head({"name": "early", "layer": 2}, None,
                                {"name": "pamr", "steps": 2, "dilations": [1, 2]}, seg.encoder))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
              for h, w in [(90, 130), (61, 60)]]
    resized = [segment.preprocess(im, 96) for im in images]
    sizes = [im.shape[:2] for im in images]
    monkeypatch.setattr(segment, "CHUNK_ELEMENTS", 600)  # many blocks per image
    logits = seg.logits_many(resized, sizes)
    for prob, area in [(0.0, None), (0.3, 0.1)]:
        seg.post = segment.PostProcess(seg.post.query_class, 4, 40.0, prob, area)
        maps = list(seg.iter_class_maps(resized, sizes))
        for head_logits, head_maps in zip(logits, maps, strict=True):
            for lg, m, size in zip(head_logits, head_maps, sizes, strict=True):
                assert m.shape == size and m.dtype == torch.int64
                assert torch.equal(m, seg.classes(lg))
                assert torch.equal(m, pre_fusion_predict(lg, seg.post))
    scratch = seg.scratch.data_ptr()
    list(seg.iter_class_maps(resized[:1], sizes[:1]))  # smaller: the scratch is reused
    assert seg.scratch.data_ptr() == scratch


@pytest.mark.parametrize("name", ["voc21", "voc20"])  # both thresholds; none (argmax only)
def test_evaluation_records_equal_the_pre_fusion_loop(name, tiny_inproc, tmp_path,
                                                      monkeypatch):
    """An in-process run's class maps and metrics are those of the loop before
    iter_class_maps (full-size logits per head, then the full-size softmax)."""
    from conftest import evaluate_in_process
    from synthetic import write_benchmark
    from test_segment import pre_fusion_predict

    from sclip_lab.metrics import SegmentationMetrics

    write_benchmark(tmp_path / "data", name, num_images=3, size=(64, 96))
    args = [*tiny_inproc, f"dataset={name}", f"data_root={tmp_path / 'data'}",
            "variants=['attention=csa','attention=vanilla postprocess=pamr']"]
    maps: dict[str, list] = {"new": [], "old": []}
    update = SegmentationMetrics.update

    def recorded(run):
        def spy(self, pred, label):
            maps[run].append(pred.clone())
            return update(self, pred, label)
        monkeypatch.setattr(SegmentationMetrics, "update", spy)

    recorded("new")
    monkeypatch.setattr(segment, "CHUNK_ELEMENTS", 4000)
    new = evaluate_in_process(args, tmp_path / "new")

    def pre_fusion(self, resized, sizes, heads=None):
        for head_logits in self.iter_heads(resized, sizes, heads):
            yield [pre_fusion_predict(lg, self.post) for lg in head_logits]

    monkeypatch.setattr(Segmenter, "iter_class_maps", pre_fusion)
    recorded("old")
    old = evaluate_in_process(args, tmp_path / "old")
    assert len(maps["new"]) == len(maps["old"]) == 6  # 3 images × 2 variants
    assert all(torch.equal(a, b) for a, b in zip(maps["new"], maps["old"]))
    assert len(new) == len(old) == 2
    for a, b in zip(new, old):
        assert a["metrics"] == b["metrics"] and a["per_class_iou"] == b["per_class_iou"]


@pytest.mark.parametrize("blocks", ["one", "many"])
def test_class_map_equals_classes_of_the_full_logits(tiny_checkpoint, monkeypatch, blocks):
    """predict's path (Segmenter.class_map: stitched and reduced in row blocks) gives
    ``classes(logits(image))`` on every pixel without ever building the full-size logits,
    thresholds and synonyms included; a PAMR head takes the full-size path."""
    seg, _ = build_segmenter(
        model={"arch": TINY, "pretrained": str(tiny_checkpoint)},
        attention={"name": "csa"}, projection=None,
        preprocess={"short_side": 96, "window": 64, "stride": 32}, postprocess=None,
        classes=["sky, cloud", "cat", "dog", "grass, lawn, field"], logit_scale=40,
        device="cpu", precision="fp32", batch_size=4, cache_dir=None)
    image = np.random.default_rng(3).integers(0, 255, (210, 150, 3), dtype=np.uint8)
    full = seg.logits(image)
    q = full.shape[0]  # 7 queries
    if blocks == "many":  # row blocks whose edges fall inside the windows
        monkeypatch.setattr(segment, "CHUNK_ELEMENTS", q * 150 * 10)
        monkeypatch.setattr(segment, "STITCH_ELEMENTS", q * 150 * 30)
    stitch = segment.stitch_blocks
    sizes = []

    def spy(*args):
        for rows, block in stitch(*args):
            sizes.append(block.numel())
            yield rows, block

    def full_size(*args, **kwargs):
        raise AssertionError("class_map built the full-size logits")

    monkeypatch.setattr(segment, "stitch_blocks", spy)
    monkeypatch.setattr(segment, "stitch_windows", full_size)
    for prob, area in [(0.0, None), (0.2, 0.1)]:
        seg.post = segment.PostProcess(seg.post.query_class, 4, 40.0, prob, area)
        got = seg.class_map(image)
        assert got.shape == (210, 150) and got.dtype == torch.int64
        assert torch.equal(got, seg.classes(full))
    assert max(sizes) <= (q * 210 * 150 if blocks == "one" else q * 150 * 30)
    assert len(sizes) == 3 * (1 if blocks == "one" else 7)  # 3 passes (area: a second)
    monkeypatch.undo()
    seg.heads = [build_head({"name": "csa"}, None, {"name": "pamr", "steps": 2,
                                                    "dilations": [1, 2]}, seg.encoder)]
    assert torch.equal(seg.class_map(image), seg.classes(seg.logits(image)))
