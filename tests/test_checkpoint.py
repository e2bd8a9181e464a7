"""Checkpoints that are whole or absent (ablate/checkpoint.py, docs/checkpoints.md):
the manifest and its checks on plain files; a real DeepSpeed engine passing over a
corrupt newest checkpoint, refusing another experiment's, surviving a full disk; and
ablate-train SIGKILLed at seeded moments (mid-step and mid-save) ending with exactly the
losses of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ablate import checkpoint as ckpt
from ablate import dist
from tests.conftest import REPO, compose, run_cli, train_args
from tests.test_train import check, losses, only_run_dir

# ------------------------------------------------------------------ manifest, plain files

LAYOUT = ckpt.Layout(world_size=2, zero_stage=1, expert_parallel=1, precision="fp32")


def stage(ckpt_dir: Path, step: int, payload: bytes = b"x" * 100) -> Path:
    staging = ckpt_dir / (ckpt.STAGING_PREFIX + ckpt.tag_of(step))
    (staging / "sub").mkdir(parents=True)
    (staging / "model.pt").write_bytes(payload)
    (staging / "sub" / "big.pt").write_bytes(b"y" * 5000)
    manifest = ckpt.build_manifest(staging, step, {"seed": 0}, LAYOUT, {}, checksum_max_bytes=1000)
    return ckpt.publish(ckpt_dir, staging, manifest)


def test_manifest_publish_verify_and_prune(tmp_path):
    for step in (2, 4, 6):
        stage(tmp_path, step)
    m = json.loads((tmp_path / "step-00000006" / ckpt.MANIFEST).read_text())
    assert m["step"] == 6 and m["world_size"] == 2 and m["zero_stage"] == 1
    assert m["files"]["model.pt"]["size"] == 100 and len(m["files"]["model.pt"]["sha256"]) == 64
    assert m["files"]["sub/big.pt"] == {"size": 5000, "sha256": None}  # above the threshold: size only
    assert set(m["code"]) in ({"git_commit", "git_dirty"}, {"package_version"})
    assert (tmp_path / ckpt.LATEST).read_text() == "step-00000006"
    assert not list(tmp_path.glob(".tmp-*"))
    assert ckpt.valid_tags(tmp_path) == [(2, "step-00000002"), (4, "step-00000004"), (6, "step-00000006")]

    tag6 = tmp_path / "step-00000006"
    (tag6 / "model.pt").write_bytes(b"z" * 100)  # same size, other bytes: only the checksum sees it
    assert ckpt.intact(tag6)
    assert ckpt.check_files(tag6, m) == ["model.pt fails its sha256 checksum"]
    assert ckpt.check_files(tag6, m, hash_share=(1, 2)) == []  # rank 1 of 2 hashes the other file
    (tag6 / "sub" / "big.pt").write_bytes(b"y")
    assert "sub/big.pt has 1 bytes, the manifest says 5000" in ckpt.check_files(tag6, m)
    assert not ckpt.intact(tag6)

    # A killed save leaves a staging dir (never a step dir without a manifest); it goes at start.
    (tmp_path / ".tmp-step-00000008").mkdir()
    (tmp_path / "step-00000009").mkdir()  # e.g. a directory copied by hand: not a checkpoint
    assert ckpt.valid_tags(tmp_path)[-1] == (4, "step-00000004")
    assert ckpt.clean_stale(tmp_path) == [".tmp-step-00000008"]

    # keep=2: the two newest intact ones stay; everything older goes, intact or not.
    stage(tmp_path, 10)
    assert ckpt.prune(tmp_path, keep=2) == ["step-00000002"]
    assert [s for s, _ in ckpt.checkpoint_tags(tmp_path)] == [4, 6, 9, 10]
    assert [s for s, _ in ckpt.valid_tags(tmp_path)] == [4, 10]


def test_same_step_saved_again_replaces_it_whole(tmp_path):
    stage(tmp_path, 3, b"old")
    stage(tmp_path, 3, b"new!")
    assert (tmp_path / "step-00000003" / "model.pt").read_bytes() == b"new!"
    assert ckpt.intact(tmp_path / "step-00000003") and not list(tmp_path.glob(".old-*"))


def test_legacy_complete_marker_still_counts(tmp_path):
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / ckpt.COMPLETE).write_text("{}")
    assert ckpt.valid_tags(tmp_path) == [(4, "step-00000004")]


def test_config_identity_ignores_harmless_keys():
    base = compose("experiment=smoke")
    same = compose("experiment=smoke", "logger=none", "paths.runs=/elsewhere", "train.log_every=7",
                   "eval.max_vqa=3", "train.keep_checkpoints=5", "train.max_bad_steps=9")
    other = compose("experiment=smoke", "optim.warmup_steps=5", "data.num_workers=2")
    h = ckpt.config_hash
    assert h(ckpt.experiment_config(base)) == h(ckpt.experiment_config(same))
    assert ckpt.config_diff(ckpt.experiment_config(base), ckpt.experiment_config(other)) == [
        "data.num_workers: 0 -> 2", "optim.warmup_steps: 2 -> 5"]


def test_layout_rules():
    zero0 = ckpt.Layout(world_size=4, zero_stage=0, expert_parallel=1, precision="fp32")
    saved = {"world_size": 2, "zero_stage": 0, "expert_parallel": 1}
    assert zero0.problems_loading(saved) == []  # whole states: any world size
    assert LAYOUT.problems_loading(saved) == ["zero_stage 0 in the checkpoint, 1 now"]
    assert LAYOUT.problems_loading({**saved, "zero_stage": 1, "world_size": 4}) == [
        "world size 4 in the checkpoint, 2 now (ZeRO stage 1 partitions the optimizer per rank)"]
    assert "expert_parallel 2 in the checkpoint, 1 now" in zero0.problems_loading({**saved, "expert_parallel": 2})


# ------------------------------------------------------------------ a real engine, in a spawned process

VOCAB, IMAGE_ID = 64, 3


def _engine(*overrides: str):
    from ablate.build import build_model
    from ablate.strategy import DeepSpeedStrategy

    cfg = compose("experiment=smoke", "decoder.dim=32", "encoder.width=16", "train.micro_batch_size=2",
                  "train.global_batch_size=2", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, IMAGE_ID)
    return model, DeepSpeedStrategy(model, cfg, 1)


def batch(model, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 24), generator=gen)
    ids[0, 1:1 + model.tokens_per_image] = IMAGE_ID
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[(ids == IMAGE_ID) | (labels == IMAGE_ID)] = -100
    return {"input_ids": ids, "labels": labels, "images": torch.randn(1, 3, 32, 32, generator=gen),
            "positions": torch.arange(24).expand(2, 24), "doc_ids": torch.zeros(2, 24, dtype=torch.long)}


def _engine_worker(rank: int, port: int, out: str) -> None:
    from ablate.strategy import CheckpointError

    torch.set_num_threads(1)
    dist.init(dist.DistEnv(0, 1, 0, "127.0.0.1", port))
    d = Path(out) / "checkpoints"
    model, s = _engine()
    weights = {}
    for step in (1, 2):
        s.micro_step(batch(model, step))
        s.save(d, step, {"step": step}, keep=3)
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    model_file = d / "step-00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    model_file.write_bytes(bytes(data))
    assert s.load_latest(d)[0] == 1  # passes over step 2, warns (checked by the caller)
    assert all(torch.equal(v, weights[1][k]) for k, v in model.state_dict().items())

    # A harmless config change resumes; a real one is refused with the keys named.
    _, harmless = _engine("logger=none", "eval.max_vqa=2", "train.log_every=3")
    assert harmless.load_latest(d)[0] == 1
    _, other = _engine("optim.warmup_steps=7")
    try:
        other.load_latest(d)
        raise AssertionError("loaded another experiment's checkpoint")
    except CheckpointError as e:
        assert "optim.warmup_steps: 2 -> 7" in str(e) and "train.strict_resume=false" in str(e), e

    # Disk full while writing the next checkpoint: the save stops, nothing of it is left,
    # the previous checkpoint is untouched and still loads.
    def full(state_dict, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    s._writer.save = full
    s.micro_step(batch(model, 3))
    try:
        s.save(d, 3, {"step": 3}, keep=1)
        raise AssertionError("a failed write went unnoticed")
    except CheckpointError as e:
        msg = str(e)
    # (The newest in place is step 2: its manifest and sizes are fine, only its checksum is not.)
    assert "No space left on device" in msg and "the previous checkpoint step-00000002 is intact" in msg, msg
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert (d / "latest").read_text() == "step-00000002"  # the failed save never got to move it
    assert s.load_latest(d)[0] == 1
    Path(out, "ok").write_text("ok")


def test_engine_passes_over_corrupt_refuses_foreign_survives_full_disk(tmp_path, capfd):
    mp.spawn(_engine_worker, args=(dist.free_port(), str(tmp_path)), nprocs=1, join=True)
    assert (tmp_path / "ok").exists()
    err = capfd.readouterr().err
    assert "skipping checkpoint" in err and "step-00000002" in err and "fails its sha256 checksum" in err


# ------------------------------------------------------------------ SIGKILL at seeded moments

KILL_ARGS = ("train.max_steps=14", "train.ckpt_every=2", "train.keep_checkpoints=2", "train.deterministic=true",
             "eval.at_end=false", "logger=none")


def _launch(corpus: Path, runs: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *train_args(corpus, runs, *KILL_ARGS)], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_and_kill(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 180

    def polled() -> bool:
        # The run renames and prunes checkpoint directories while rglob walks them.
        try:
            return bool(ready())
        except FileNotFoundError:
            return False

    while not polled():
        assert proc.poll() is None, f"finished before {what}: " + proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def test_sigkill_mid_step_and_mid_save_resumes_bit_exact(corpus, tmp_path):
    straight_runs, runs = tmp_path / "straight", tmp_path / "runs"
    check(run_cli(train_args(corpus, straight_runs, *KILL_ARGS)))
    straight = losses(only_run_dir(straight_runs))
    assert sorted(straight) == list(range(1, 15))

    rng = random.Random(20240611)
    kills = [("step", rng.randint(3, 5)), ("save", None), ("step", rng.randint(10, 12))]
    for kind, target in kills:
        if kind == "step":  # after the target step's metrics line
            proc = _launch(corpus, runs)
            _wait_and_kill(proc, lambda: list(runs.rglob("metrics.jsonl"))
                           and max(losses(only_run_dir(runs)), default=0) >= target, f"step {target}")
        else:  # while files sit in a staging directory (the hook holds each write open)
            proc = _launch(corpus, runs, {ckpt.SLOW_SAVE_ENV: "1.0"})
            _wait_and_kill(proc, lambda: list(runs.rglob(".tmp-step-*/*.pt")), "a checkpoint write")
            run_dir = only_run_dir(runs)
            assert list((run_dir / "checkpoints").glob(".tmp-step-*"))  # the killed save's leftovers
    res = check(run_cli(train_args(corpus, runs, *KILL_ARGS)))
    run_dir = only_run_dir(runs)
    assert "resumed from step" in res.stdout
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert losses(run_dir) == straight  # every step, bit for bit
    assert json.loads((run_dir / "results.json").read_text())["step"] == 14


# ------------------------------------------------------------------ a real full disk (tmpfs)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3.5 MiB tmpfs: room for one smoke checkpoint (2.2 MB) but not a second beside it."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3584k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the in-process ENOSPC test covers it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_stops_run_and_keeps_previous_checkpoint(corpus, small_tmpfs):
    args = ("train.max_steps=6", "train.ckpt_every=2", "train.keep_checkpoints=1", "eval.at_end=false",
            "logger=none")
    res = run_cli(train_args(corpus, small_tmpfs, *args))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "could not write the checkpoint of step 4" in res.stderr
    assert "the previous checkpoint step-00000002 is intact" in res.stderr
    run_dir = only_run_dir(small_tmpfs)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002"]
    assert ckpt.valid_tags(ckpts) == [(2, "step-00000002")]
    m = ckpt.read_manifest(ckpts / "step-00000002")
    assert ckpt.check_files(ckpts / "step-00000002", m) == []
