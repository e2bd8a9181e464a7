"""Rank bookkeeping: the launcher environment is read correctly, and logged numbers
are reduced over real gloo processes."""

from __future__ import annotations

import torch.multiprocessing as mp

from ablate import dist


def _reduce_worker(rank: int, port: int, out) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # rank 0 contributes (1, 10), rank 1 (2, 20): a mean of 1.5 and a sum of 30.
    out[rank] = dist.reduce_over_ranks([rank + 1.0, 10.0 * (rank + 1)], mean=[True, False])
    tdist.destroy_process_group()


def test_reduce_over_ranks_two_gloo_processes():
    port = dist.free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_reduce_worker, args=(port, out), nprocs=2, join=True)
        assert out[0] == out[1] == [1.5, 30.0]


def test_reduce_over_ranks_is_identity_in_one_process():
    assert dist.reduce_over_ranks([2.0, 3.0], mean=[True, False]) == [2.0, 3.0]


def test_detect_reads_torchrun_then_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_NODELIST", "gpu[07-08]")
    env = dist.detect()
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 12345 % 20000
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29555")
    env = dist.detect()  # torchrun's variables take precedence
    assert (env.rank, env.world_size, env.master_port) == (1, 2, 29555)
