"""The shared-trunk engine: several heads and images in one pass change no prediction."""

from __future__ import annotations

import numpy as np
import torch
from conftest import TINY

from sclip_lab import segment
from sclip_lab.pipeline import build_head, build_segmenter


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
