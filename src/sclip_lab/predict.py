"""Segment one image: ``python -m sclip_lab.predict image=PATH output=PRED.png``.

Takes every override of ``sclip_lab.run``; the vocabulary is the dataset's (with its
logit scale and thresholds) or a free list ``classes="[cat, dog, grass]"``. Writes the
prediction as a palette PNG and, with ``logits=FILE.npy``, the stitched cosine logits
``(Q, H, W)`` float32 at the original size, before the logit scale; with
``overlay=FIG.png`` the image, the prediction and a legend of the classes present.

Only ``logits=`` and ``postprocess=pamr`` (which mixes pixels across rows) build those
full-size logits; otherwise they are stitched and reduced in row blocks, so an image of
any size costs about its class map in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from sclip_lab import data, viz
from sclip_lab.build import segmenter_from_config, vocabulary
from sclip_lab.cli import hydra_entry
from sclip_lab.errors import ConfigError, check_writable_dir
from sclip_lab.files import atomic_target

log = logging.getLogger("sclip_lab")


def predict(cfg: DictConfig) -> np.ndarray:
    """Segment ``cfg.image``; write ``cfg.output`` (and ``cfg.logits``, the figure
    ``cfg.overlay``); return ``(H, W)``."""
    output = Path(cfg.output)
    if output.suffix.lower() != ".png":
        raise ConfigError(f"output={output} must be a .png file (a palette PNG is written)")
    overlay = Path(cfg.overlay) if cfg.get("overlay") else None
    if overlay is not None and overlay.suffix.lower() != ".png":
        raise ConfigError(f"overlay={overlay} must be a .png file (a figure is written)")
    if overlay is not None and overlay.resolve() == output.resolve():
        raise ConfigError(f"overlay={overlay} is output= too; give the figure its own file")
    outputs = [("output", output)] + ([("logits", Path(cfg.logits))] if cfg.logits else [])
    outputs += [("overlay", overlay)] if overlay is not None else []
    for key, path in outputs:
        if path.is_dir():
            raise ConfigError(f"{key}={path} is a directory; give a file path")
        check_writable_dir(path.parent, f"{key}={path}: its folder")
    classes, scale, prob_thd, area_thd = vocabulary(cfg)
    check_palette(len(classes), output)
    image = data.read_image(Path(cfg.image))
    segmenter, info = segmenter_from_config(cfg, classes, scale, prob_thd, area_thd)
    logits = segmenter.logits(image) if cfg.logits else None
    pred = (segmenter.class_map(image) if logits is None
            else segmenter.classes(logits)).cpu().numpy()
    with atomic_target(output) as tmp:
        viz.save_palette_png(pred, tmp)
    if logits is not None:
        with atomic_target(cfg.logits) as tmp, open(tmp, "wb") as f:
            np.save(f, logits.cpu().numpy().astype(np.float32))
    names = viz.class_names(classes, has_background=prob_thd > 0)
    if overlay is not None:  # through a temporary name, as run's overlays
        viz.save_figure(viz.overlay_figure(image, pred, names),
                        overlay.with_name(overlay.stem), formats=(overlay.suffix[1:],))
    counts = np.bincount(pred.ravel(), minlength=len(classes))  # O(pixels), no sorted copy
    found = {names[c]: int(counts[c]) for c in np.flatnonzero(counts)}
    log.info("%s: %s", cfg.image, ", ".join(f"{k} {v / pred.size:.1%}" for k, v in
                                            sorted(found.items(), key=lambda kv: -kv[1])))
    wrote = f"{output} and {overlay}" if overlay is not None else f"{output}"
    print(f"wrote {wrote} ({pred.shape[1]}×{pred.shape[0]}, {len(classes)} classes, "
          f"{info['arch']} {info['precision']})")
    return pred


def check_palette(num_classes: int, output: Path) -> None:
    """Refuse, before any model is loaded, a vocabulary the palette PNG cannot hold."""
    if num_classes > viz.PALETTE_CLASSES:
        raise ConfigError(f"{num_classes} classes do not fit output={output}: a palette PNG "
                          f"holds at most {viz.PALETTE_CLASSES} classes; give at most "
                          f"{viz.PALETTE_CLASSES} (merge synonyms into one entry as "
                          "\"cat, kitten\", or split the list over several runs)")


@hydra_entry("predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
