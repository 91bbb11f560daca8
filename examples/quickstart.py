# %% [markdown]
# # sclip_lab quickstart
#
# Load a method, segment an image, show it, compare two methods, evaluate on a few
# images. A script in py:percent cells: run it as `python examples/quickstart.py`, or open
# it in Jupyter / VS Code (jupytext reads the `# %%` cells as a notebook).
#
# Settings (environment variables, all optional): `SCLIP_DATA` the folder holding VOC
# (`data/VOCdevkit/VOC2012`), `SCLIP_EXAMPLE_IMAGE` the image to segment (default: the
# first VOC image), `SCLIP_EXAMPLE_LIMIT` images to evaluate (default 8),
# `SCLIP_EXAMPLE_OUT` where the figures go; `SCLIP_EXAMPLE_MODEL`,
# `SCLIP_EXAMPLE_PRETRAINED`, `SCLIP_EXAMPLE_CONFIG_FILE` another backbone (the default is
# the paper's OpenAI ViT-B/16).

# %%
import os
from pathlib import Path

import sclip_lab

DATA = Path(os.environ.get("SCLIP_DATA", "data"))
OUT = Path(os.environ.get("SCLIP_EXAMPLE_OUT", "outputs/quickstart"))
LIMIT = int(os.environ.get("SCLIP_EXAMPLE_LIMIT", "8"))
BACKBONE = {"model": os.environ.get("SCLIP_EXAMPLE_MODEL", "vit_b16_openai"),
            "pretrained": os.environ.get("SCLIP_EXAMPLE_PRETRAINED") or None}
if os.environ.get("SCLIP_EXAMPLE_CONFIG_FILE"):  # a custom open_clip architecture
    BACKBONE["config_file"] = os.environ["SCLIP_EXAMPLE_CONFIG_FILE"]
IMAGE = os.environ.get("SCLIP_EXAMPLE_IMAGE") or min(
    (DATA / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The methods and their knobs

# %%
for method in sclip_lab.methods():
    print(method)

# %% [markdown]
# ## Load one and segment an image
# `segment` takes a path, an (H, W, 3) uint8 array, a PIL image or a (3, H, W) tensor, or
# a list of them, and returns the (H, W) class map(s); `logits` the (Q, H, W) cosines.

# %%
seg = sclip_lab.load("csa", dataset="voc21", **BACKBONE)
pred = seg.segment(IMAGE)
print(pred.shape, "classes present:", sorted({seg.class_names[c] for c in set(pred.flat)}))

# %%
image = sclip_lab.images.as_rgb(IMAGE)
fig = sclip_lab.viz.overlay_figure(image, pred, seg.class_names)
fig.savefig(OUT / "csa.png")
fig  # noqa: B018 - a notebook shows the figure

# %% [markdown]
# ## Compare two methods (knobs as keyword arguments)

# %%
other = sclip_lab.load("naclip", sigma=3, dataset="voc21", **BACKBONE)
preds = {"SCLIP (csa)": pred, "NACLIP σ=3": other.segment(image)}
fig = sclip_lab.viz.overlay_figure(image, preds, seg.class_names)
fig.savefig(OUT / "csa_vs_naclip.png")
fig  # noqa: B018

# %% [markdown]
# ## Evaluate on a few images
# The same loop and numbers as `python -m sclip_lab.run dataset=voc21 limit=...`.

# %%
for name, model in (("csa", seg), ("naclip sigma=3", other)):
    scores = model.evaluate("voc21", data_root=DATA, limit=LIMIT)
    print(f"{name}: mIoU {scores['mIoU']:.2f}  aAcc {scores['aAcc']:.2f} "
          f"on {scores['num_images']} images")
