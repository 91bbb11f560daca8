"""Train the learned CSA projection of Table 2: ``python -m sclip_lab.learn dataset=voc21
[steps=300 lr=0.001 seed=0 images=64]``.

The artefact goes to ``cache_dir/learned/`` (where ``projection=learned`` finds it) and
into the run directory with ``learn.json`` (losses, config); the loss curve goes to W&B.
See ``sclip_lab.learned`` for what is trained and how.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sclip_lab.cli import hydra_entry
from sclip_lab.errors import check_writable_dir
from sclip_lab.files import write_json_atomic
from sclip_lab.learned import train, training_images
from sclip_lab.tracking import Tracker

log = logging.getLogger("sclip_lab")


@hydra_entry("learn")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_writable_dir(Path(cfg.cache_dir) / "learned", "cache_dir")
    dataset = training_images(cfg)  # every check before W&B and the model start
    tracker = Tracker(OmegaConf.to_container(cfg.logger, resolve=True), run_dir)
    ok = False
    try:
        tracker.start(OmegaConf.to_container(cfg, resolve=True), name=cfg.name,
                      tags=["learn", cfg.dataset.name])
        path = train(cfg, tracker, dataset)
        payload = torch.load(path, weights_only=False)
        torch.save(payload, run_dir / "projection.pt")
        write_json_atomic(run_dir / "learn.json", {
            "artefact": str(path), "key": payload["key"], "losses": payload["losses"],
            "num_windows": payload["num_windows"], "config": payload["config"]})
        print(f"learned projection -> {path}")
        ok = True
    finally:
        tracker.finish(ok)


if __name__ == "__main__":
    main()
