"""The last-block outputs of the named variants, frozen before the recipe refactor.

``python tests/golden_last_block.py`` wrote ``tests/data/last_block_golden.pt`` at commit
7608591 (the variants as separate functions). ``test_recipe.py`` recomputes every case with
today's code and requires the same features, so presets keep the numbers of old records.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import open_clip
import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "last_block_golden.pt"
CONFIG = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 3, "width": 128, "patch_size": 16,
                   "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 1},
}
# (attention section, projection section or None)
CASES = [
    ({"name": "vanilla"}, None),
    ({"name": "sharpen", "temperature": 8.0}, None),
    ({"name": "sharpen", "temperature": 2.0}, None),
    ({"name": "sharpen", "temperature": 0.0}, None),
    ({"name": "local", "kernel": 3}, None),
    ({"name": "local", "kernel": 5}, None),
    ({"name": "early", "layer": 1}, None),
    ({"name": "early", "layer": 3}, None),
    ({"name": "maskclip"}, None),
    ({"name": "clearclip"}, None),
    ({"name": "naclip", "sigma": 5.0}, None),
    ({"name": "naclip", "sigma": 2.0}, None),
    ({"name": "csa", "temperature": 8.0, "combine": None}, None),
    ({"name": "csa", "temperature": 4.0, "combine": None}, {"name": "qk", "combine": "sum"}),
    ({"name": "csa", "temperature": 8.0, "combine": "mean"}, {"name": "qk", "combine": "sum"}),
    ({"name": "csa", "temperature": 8.0, "combine": None}, {"name": "q"}),
    ({"name": "csa", "temperature": 8.0, "combine": None}, {"name": "identity"}),
    ({"name": "csa", "temperature": 8.0, "combine": None},
     {"name": "random", "n": 3, "trial": 1, "combine": "mean"}),
]


def model_and_trunk():
    """A 3-block ViT with weights from a fixed generator, and its trunk on one fixed
    ``(1, 3, 96, 112)`` window (6×7 grid) keeping every block's vanilla map."""
    from sclip_lab.model import DenseEncoder

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "golden-vit.json"
        path.write_text(json.dumps(CONFIG))
        open_clip.add_model_config(path)
    model = open_clip.create_model("golden-vit").eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.visual.named_parameters()):
            scale = 1.0 if "ln" in name and name.endswith("weight") else 0.05
            base = 1.0 if scale == 1.0 else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
    enc = DenseEncoder(model.visual)
    image = torch.randn(1, 3, 96, 112, generator=gen)
    with torch.no_grad():
        trunk = enc.trunk(image, early_layers=(1, 2))
    return enc, trunk


def outputs(enc, trunk) -> list[torch.Tensor]:
    from sclip_lab.pipeline import build_last_block

    outs = []
    with torch.no_grad():
        for attention, projection in CASES:
            last = build_last_block(attention, projection, enc)
            outs.append(enc.head(trunk, last))
    return outs


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent / "src"))
    enc, trunk = model_and_trunk()
    torch.save({"cases": CASES, "features": outputs(enc, trunk)}, GOLDEN)
    print(f"wrote {GOLDEN}")
