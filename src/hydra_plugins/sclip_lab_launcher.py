"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher with sclip_lab's
submission report and job following (``sclip_lab.slurm.launch_on_slurm``).

Hydra instantiates launchers only from the ``hydra_plugins`` package, hence this module;
it stays light (Hydra imports every ``hydra_plugins`` module when it starts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as SubmititSlurmLauncher,
)


class SlurmLauncher(SubmititSlurmLauncher):
    """Submits like hydra-submitit-launcher (each job runs ``__call__``, requeues through
    ``checkpoint``); reports and waits with ``sclip_lab.slurm.launch_on_slurm``."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> list[Any]:
        from sclip_lab.slurm import launch_on_slurm

        return launch_on_slurm(self, job_overrides, initial_job_idx)
