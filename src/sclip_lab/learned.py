"""The learned CSA projection of Table 2 (docs/protocol.md §8): its artefact and training.

Everything but one d×d matrix W (and its bias, both initialised from W_q, b_q) is frozen.
Blocks 1…depth−1 do not depend on W, so their outputs for every training window are
computed once; each step then runs only the last block, the head and the loss: pixel
cross-entropy (ignore 255) of the protocol's class logits (synonym max, logit scale) on
the windows of ``images`` training images resized as at evaluation. The artefact (W, b,
config, loss curve) lives at ``cache_dir/learned/<dataset>-<key>.pt``.

Evaluation only looks artefacts up (``learned_projection``); it trains one only when asked
to (``projection.auto_train=true``). ``python -m sclip_lab.learn`` is the training command.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from sclip_lab import attention as attn
from sclip_lab import data, segment
from sclip_lab.data import IGNORE_INDEX
from sclip_lab.errors import ConfigError, integer, number
from sclip_lab.files import atomic_target
from sclip_lab.model import DenseEncoder, LastBlock, TrunkOutput, patch_logits
from sclip_lab.pipeline import Preprocess, build_segmenter
from sclip_lab.tracking import Tracker

log = logging.getLogger("sclip_lab")


@dataclass
class WindowSet:
    """Frozen trunk outputs of training windows and their label crops.

    Attributes:
        trunks: ``TrunkOutput`` per window-size group, ``x`` of shape ``(n, N, D)``.
        labels: per group, ``(n, hc, wc)`` int64 labels (255 ignored).
    """

    trunks: list[TrunkOutput]
    labels: list[Tensor]

    def __len__(self) -> int:
        return sum(len(lab) for lab in self.labels)


def artefact_key(cfg: DictConfig) -> str:
    """Identity of a learned projection: weights, dataset, preprocessing, hyper-parameters."""
    p = cfg.projection
    blob = {"arch": cfg.model.arch, "pretrained": str(cfg.model.pretrained),
            "dataset": cfg.dataset.name, "preprocess": OmegaConf.to_container(cfg.preprocess,
                                                                               resolve=True),
            "templates": cfg.text.templates, "steps": int(p.steps), "lr": float(p.lr),
            "images": int(p.images), "seed": int(p.seed), "batch_windows": int(p.batch_windows)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def artefact_path(cfg: DictConfig) -> Path:
    name = f"{cfg.dataset.name}-{artefact_key(cfg)}.pt"
    return Path(cfg.cache_dir).expanduser() / "learned" / name


def train_section(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset section pointed at its training split (``dataset.train`` overrides)."""
    section = dict(dataset)
    train = section.pop("train", None)
    if not train:
        raise ConfigError(f"dataset {section.get('name')} declares no training split "
                          "(dataset.train); pass projection.path=<artefact> instead")
    section.update(train)
    return section


@torch.no_grad()
def collect_windows(encoder: DenseEncoder, dataset, prep: Preprocess,
                    batch: int = 16) -> WindowSet:
    """Trunk outputs of every sliding window of every image, grouped by window size."""
    groups: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}
    device = next(encoder.parameters()).device
    for item in tqdm(dataset, desc="training windows", unit="img"):
        image = prep(item["image"])
        h, w = image.shape[-2:]
        label = cv2.resize(item["label"].astype(np.uint8), (w, h),
                           interpolation=cv2.INTER_NEAREST)
        label = torch.from_numpy(label.astype(np.int64))
        for y1, y2, x1, x2 in prep.boxes(h, w):
            xs, ys = groups.setdefault((y2 - y1, x2 - x1), ([], []))
            xs.append(image[:, y1:y2, x1:x2])
            ys.append(label[y1:y2, x1:x2])
    trunks, labels = [], []
    for crops, labs in groups.values():
        outs = [encoder.trunk(torch.stack(crops[i:i + batch]).to(device))
                for i in range(0, len(crops), batch)]
        trunks.append(TrunkOutput(torch.cat([o.x for o in outs]), outs[0].grid))
        labels.append(torch.stack(labs).to(device))
    return WindowSet(trunks, labels)


def class_logits(encoder: DenseEncoder, trunk: TrunkOutput, last: LastBlock, queries: Tensor,
                 query_class: Tensor, num_classes: int, logit_scale: float,
                 size: tuple[int, int]) -> Tensor:
    """``(B, C, hc, wc)``: window logits × scale, max over each class's synonyms."""
    logits = patch_logits(encoder.head(trunk, last), queries, trunk.grid)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False) * logit_scale
    return segment.synonym_max(logits, query_class, num_classes, dim=1)


def fit_projection(encoder: DenseEncoder, windows: WindowSet, queries: Tensor,
                   query_class: Tensor, num_classes: int, logit_scale: float, *, steps: int,
                   lr: float, seed: int, batch_windows: int, tracker: Tracker | None = None
                   ) -> tuple[Tensor, Tensor, list[float]]:
    """AdamW on (W, b) from (W_q, b_q); returns (W, b, loss per step)."""
    (wq, bq), _, _ = attn.qkv_weights(encoder.visual.transformer.resblocks[-1].attn)
    weight = wq.detach().float().clone().requires_grad_(True)
    bias = bq.detach().float().clone().requires_grad_(True)
    opt = torch.optim.AdamW([weight, bias], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([len(lab) for lab in windows.labels], dtype=torch.float)
    losses = []
    for step in (bar := tqdm(range(steps), desc="learn projection", unit="step")):
        g = int(torch.multinomial(sizes, 1, generator=gen))
        idx = torch.randperm(len(windows.labels[g]), generator=gen)[:batch_windows]
        trunk = TrunkOutput(windows.trunks[g].x[idx.to(windows.trunks[g].x.device)],
                            windows.trunks[g].grid)
        target = windows.labels[g][idx.to(windows.labels[g].device)]
        last = LastBlock(attn.get_variant("csa"), {
            "projections": [(weight.to(trunk.x.dtype), bias.to(trunk.x.dtype))],
            "combine": attn.DEFAULT_COMBINE, "temperature": attn.HEAD_TEMPERATURE})
        logits = class_logits(encoder, trunk, last, queries, query_class, num_classes,
                              logit_scale, tuple(target.shape[-2:]))
        if (target != IGNORE_INDEX).any():
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if tracker is not None:
                tracker.log({"train/loss": losses[-1], "train/step": step})
    return weight.detach(), bias.detach(), losses


def training_images(cfg: DictConfig):
    """The first ``projection.images`` training images, after checking every setting of
    the training (before any model is built).

    Raises:
        DataError: the training split is not on disk (with the prepare command, train=true).
    """
    p = cfg.projection
    integer(p.steps, "projection.steps", 1)
    integer(p.batch_windows, "projection.batch_windows", 1)
    number(p.lr, "projection.lr", above=0)
    integer(p.seed, "projection.seed")
    images = integer(p.images, "projection.images", 1)
    section = train_section(OmegaConf.to_container(cfg.dataset, resolve=True))
    root = data.resolve_data_root(cfg.data_root)
    try:
        return data.build_dataset(section, root, images, None)
    except data.DataError as e:  # the training split is prepared only on request
        hint = data.prepare_hint(data.spec_from_config(cfg.dataset), root)
        raise data.DataError(f"training split: {str(e).replace(hint, hint + ' train=true')}"
                             ) from None


def train(cfg: DictConfig, tracker: Tracker | None = None, dataset=None) -> Path:
    """Train the projection for ``cfg`` on ``dataset`` (default: ``training_images``) and
    save it at ``artefact_path(cfg)``."""
    dataset = training_images(cfg) if dataset is None else dataset
    p = cfg.projection
    steps, batch_windows = int(p.steps), int(p.batch_windows)
    torch.manual_seed(int(p.seed))
    spec = data.spec_from_config(cfg.dataset)
    segmenter, info = build_segmenter(
        model=cfg.model, attention={"name": "csa"}, projection=None, preprocess=cfg.preprocess,
        postprocess=None, classes=list(spec.classes), logit_scale=spec.logit_scale,
        templates=cfg.text.templates, device=cfg.device, precision=cfg.precision,
        batch_size=cfg.batch_size, cache_dir=cfg.cache_dir)
    enc, prep = segmenter.encoder, segmenter.prep
    windows = collect_windows(enc, dataset, prep,
                              cfg.batch_size)
    log.info("learning a projection on %d windows of %d %s training images", len(windows),
             len(dataset), spec.name)
    weight, bias, losses = fit_projection(
        enc, windows, segmenter.queries, segmenter.post.query_class.to(segmenter.device),
        spec.num_classes, spec.logit_scale, steps=steps, lr=float(p.lr), seed=int(p.seed),
        batch_windows=batch_windows, tracker=tracker)
    path = artefact_path(cfg)
    payload = {"weight": weight.cpu(), "bias": bias.cpu(), "losses": losses,
               "key": artefact_key(cfg), "model": info, "num_windows": len(windows),
               "config": OmegaConf.to_container(cfg, resolve=True)}
    with atomic_target(path) as tmp:
        torch.save(payload, tmp)
    log.info("saved learned projection %s (loss %.4f -> %.4f)", path,
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return path


def read_artefact(path: Path) -> tuple[Tensor, Tensor | None]:
    """(W, b) of an artefact file, checked: a finite square float matrix, a matching bias.

    Raises:
        ValueError: the file is unreadable, truncated or holds something else.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        weight, bias = payload["weight"], payload.get("bias")
    except Exception as e:  # noqa: BLE001 - any failure means the file is not an artefact
        raise ValueError(f"{type(e).__name__}: {e}") from None
    ok = (isinstance(weight, Tensor) and weight.ndim == 2 and weight.shape[0] == weight.shape[1]
          and weight.is_floating_point() and bool(torch.isfinite(weight).all()))
    if ok and bias is not None:
        ok = (isinstance(bias, Tensor) and tuple(bias.shape) == (weight.shape[0],)
              and bias.is_floating_point() and bool(torch.isfinite(bias).all()))
    if not ok:
        raise ValueError("it holds no finite square float matrix W with a matching bias")
    return weight, bias


def load_artefact(path: Path) -> tuple[Tensor, Tensor | None]:
    try:
        return read_artefact(path)
    except ValueError as e:
        raise ConfigError(f"projection.path={path} is not a learned-projection artefact "
                          f"({e}); train one with python -m sclip_lab.learn") from None


def learned_projection(cfg: DictConfig) -> tuple[Tensor, Tensor | None]:
    """The (W, b) for ``projection=learned``: the given file, the matching artefact, or
    a freshly trained one (``projection.auto_train``). A cached artefact that cannot be
    read is reported, dropped and trained again."""
    if cfg.projection.path:
        path = Path(cfg.projection.path).expanduser()
        if not path.is_file():
            raise ConfigError(f"projection.path={path} does not exist; train it with "
                              f"python -m sclip_lab.learn dataset={cfg.dataset.name}")
        return load_artefact(path)
    path = artefact_path(cfg)
    if path.is_file():
        try:
            return read_artefact(path)
        except ValueError as e:
            log.warning("dropping the broken cached projection %s (%s)", path, e)
            path.unlink(missing_ok=True)
    if not cfg.projection.auto_train:
        raise ConfigError(f"no learned projection for this config at {path}; run "
                          f"python -m sclip_lab.learn dataset={cfg.dataset.name} "
                          "(same model/preprocess/steps/lr/images/seed) first, set "
                          "projection.path, or add projection.auto_train=true")
    log.info("no learned projection at %s: training it first (projection.auto_train=true)",
             path)
    try:
        train(cfg)
    except data.DataError as e:
        raise ConfigError(f"projection=learned: no artefact at {path} and training is "
                          f"impossible ({e}); pass projection.path=<artefact>") from None
    return load_artefact(path)
