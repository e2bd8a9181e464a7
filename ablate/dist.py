"""Where this process sits in the job: rank, world size, local rank, master address.

One reader for the launchers people use: torchrun and the DeepSpeed launcher (they
set RANK/WORLD_SIZE/LOCAL_RANK), SLURM's srun (SLURM_PROCID/SLURM_NTASKS/...), or
nothing at all (a single process, which gets a free local port so that several
single-process runs and tests can coexist on one machine).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    # The first host of the allocation; SLURM_NODELIST is compressed ("node[01-04]"),
    # so take the prefix and the first number of the first range.
    env = os.environ
    nodes = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
             or env.get("SLURM_NODELIST", ""))
    if not nodes:
        return "127.0.0.1"
    first = nodes.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def detect() -> DistEnv:
    """Read the launcher's environment (torchrun/deepspeed first, then SLURM)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        job = int(env.get("SLURM_JOB_ID", 0))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _slurm_master(),
            # A port derived from the job id: all tasks agree without talking.
            master_port=int(env.get("MASTER_PORT", 20000 + job % 20000)),
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port())


def init(env: DistEnv) -> None:
    """Start the process group once per process (a multirun reuses it)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def reduce_over_ranks(values: list[float], mean: list[bool]) -> list[float]:
    """Sum ``values`` over all ranks (one all-reduce); entries flagged in ``mean`` are
    divided by the world size. Identity in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    on_gpu = dist.get_backend() == "nccl"  # NCCL reduces device tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    world = dist.get_world_size()
    return [v / world if m else v for v, m in zip(t.tolist(), mean)]


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")
