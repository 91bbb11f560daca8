"""A single-node SLURM for tests (``start_local_slurm.sh``) and what the tests ask of it.

``LocalSlurm.start(dir)`` brings up munged, slurmctld and slurmd under ``dir`` and returns
the cluster, or raises ``SlurmUnavailable`` with the reason (packages missing, not root, a
daemon that did not come up); ``stop()`` cancels its jobs and stops the daemons.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
START = HERE / "start_local_slurm.sh"
STOP = HERE / "stop_local_slurm.sh"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why."""


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"

    @classmethod
    def start(cls, root: Path, timeout_s: float = 120) -> LocalSlurm:
        try:
            proc = subprocess.run(["bash", str(START), str(root)], capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            subprocess.run(["bash", str(STOP), str(root)], capture_output=True, timeout=60)
            raise SlurmUnavailable(f"start_local_slurm.sh took over {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            raise SlurmUnavailable(proc.stderr.strip() or f"exit status {proc.returncode}")
        return cls(root)

    def stop(self) -> None:
        subprocess.run(["bash", str(STOP), str(self.root)], capture_output=True, timeout=120)

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that talks to this cluster (and its jobs inherit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf),
                "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}

    def run(self, *command: str, check: bool = True) -> str:
        proc = subprocess.run(list(command), capture_output=True, text=True, env=self.env,
                              timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {proc.stderr.strip()}")
        return proc.stdout

    def states(self) -> dict[str, str]:
        """``{job id (<array>_<task>): state}`` of every job the controller knows."""
        out = self.run("squeue", "--noheader", "--array", "--states=all", "--format=%i|%T")
        return dict(line.split("|", 1) for line in out.split())

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as ``{key: value}`` (JobState, Restarts, Requeue, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_state(self, job_id: str, states: set[str], timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.states().get(job_id, "")
            if state in states:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s} s")

    def signal(self, job_id: str, signal: str) -> None:
        """``scancel --signal=SIG``: to the job's steps (submitit's python), as SLURM does."""
        self.run("scancel", f"--signal={signal}", job_id)

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id)


def task_processes(job_id: str) -> list[int]:
    """Pids of the python (``submitit.core._submit``) of job ``<id>`` or array task
    ``<array>_<task>`` on this machine, from /proc."""
    array, _, task = job_id.partition("_")
    want = ({b"SLURM_ARRAY_JOB_ID=" + array.encode(), b"SLURM_ARRAY_TASK_ID=" + task.encode()}
            if task else {b"SLURM_JOB_ID=" + job_id.encode()})
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"submitit.core._submit" not in (proc / "cmdline").read_bytes():
                continue
            if want <= set((proc / "environ").read_bytes().split(b"\0")):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def process_state(pid: int) -> str:
    """One letter: R running, S sleeping, T stopped, ... (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def wandb_runs(root: Path) -> list[dict[str, Any]]:
    """``{"group", "config"}`` of every offline W&B run under ``root``, read from its
    ``run-*.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(Path(root).rglob("run-*.wandb")):
        for record in _records(path.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(record)
            if rec.WhichOneof("record_type") == "run":
                config = {item.key: json.loads(item.value_json)
                          for item in rec.run.config.update}
                runs.append({"path": path, "group": rec.run.run_group, "config": config})
    return runs


def _records(data: bytes, block: int = 32768) -> list[bytes]:
    """The records of a W&B datastore file: a 7-byte header (":W&B", magic, version),
    then 32 KiB blocks of chunks (crc32 4, length 2, type 1: full 1, first 2, middle 3,
    last 4), a record split over chunks where it crosses a block."""
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            out.append(pending)
            pending = b""
    return out
