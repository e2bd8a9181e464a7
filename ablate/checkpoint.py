"""Checkpoint directories that are either whole or absent: staging, manifest, verification.

A checkpoint of step N is written in three moves (docs/checkpoints.md):

1. every rank writes its files into ``checkpoints/.tmp-step-N/`` (the staging directory;
   DeepSpeed is pointed at it with ``save_latest=False``), fsyncs them and reports their
   sizes and sha256 to rank 0;
2. after a barrier rank 0 writes ``MANIFEST.json`` last (step, experiment-config hash,
   layout, code version, every file with its size and checksum) and fsyncs it;
3. rank 0 renames the staging directory to ``step-N`` (atomic within one filesystem),
   fsyncs ``checkpoints/`` and replaces the ``latest`` pointer (DeepSpeed's format: the
   tag name) atomically; only then are checkpoints beyond the newest K deleted.

A directory named ``step-N`` therefore always carries its manifest; a killed save leaves
only a ``.tmp-*`` directory, removed at the next start. Loading scans the ``step-*``
directories newest first and takes the first whose files match their manifest (sizes,
and checksums up to ``train.checksum_max_mb``), warning about each one it passes over;
``latest`` is a convenience for people and DeepSpeed's tools, not what resume trusts.

Checkpoints written before manifests existed carry a ``COMPLETE`` marker instead; they
are still read (unverified, with a warning) so older runs resume and evaluate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "MANIFEST.json"
LATEST = "latest"
COMPLETE = "COMPLETE"  # the marker of checkpoints written before manifests
STAGING_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
FORMAT = 1

NON_EXPERIMENT_KEYS = (
    "name", "paths", "logger", "eval", "train.log_every", "train.progress", "train.ckpt_every",
    "train.keep_checkpoints", "train.preempt_signal", "train.max_requeues", "train.max_bad_steps",
    "train.init_from", "train.checksum_max_mb", "train.strict_resume",
)
"""Config keys (and key prefixes) that do not change what is trained: left out of the
config hash, so changing them between launches never blocks a resume. ``train.init_from``
is here because a resumed run ignores it; ``data.num_workers`` is not, because the batch
order depends on it (ablate/data/pipeline.py)."""


SLOW_SAVE_ENV = "ABLATE_TEST_SLOW_SAVE"
"""Test hook: seconds to sleep after writing each checkpoint file, which holds a save open
long enough for tests/test_checkpoint.py to kill the process in the middle of it."""


class GuardedWriter:
    """Stands in for DeepSpeed's ``checkpoint_engine.save``: records every file written
    (its owner hashes and fsyncs it for the manifest) and, when a write fails, remembers
    the error and writes nothing more instead of raising, so that this rank still reaches
    DeepSpeed's barriers and the ranks can agree to abandon the save together. torch's
    zip writer reports a full disk as a ``RuntimeError`` ("unexpected pos ..."), not an
    ``OSError``: both count as a failed write."""

    def __init__(self, save):
        self.save = save
        self.slow_s = float(os.environ.get(SLOW_SAVE_ENV) or 0)
        self.begin()

    def begin(self) -> None:
        self.written: list[Path] = []
        self.error: Exception | None = None

    def __call__(self, state_dict, path: str) -> None:
        if self.error is not None:
            return
        try:
            self.save(state_dict, path)
        except (OSError, RuntimeError) as e:
            self.error = e
            return
        self.written.append(Path(path))
        if self.slow_s:
            time.sleep(self.slow_s)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none that exists can be resumed from."""


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    if not name.startswith("step-"):
        return None
    try:
        return int(name.split("-", 1)[1])
    except ValueError:
        return None


# ------------------------------------------------------------------ what is recorded


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def experiment_config(cfg) -> dict:
    """The resolved config as flat ``key: value`` pairs, minus :data:`NON_EXPERIMENT_KEYS`."""
    from omegaconf import OmegaConf

    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in sorted(flat.items())
            if not any(k == p or k.startswith(p + ".") for p in NON_EXPERIMENT_KEYS)}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_version() -> dict:
    """The git commit of this checkout and whether its sources differ from it
    (``ablate.snapshot.git_state``); the installed package's version outside git."""
    from ablate.snapshot import git_state, source_root

    g = git_state(source_root())
    if g["commit"] is not None:
        return {"git_commit": g["commit"], "git_dirty": g["dirty"]}
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"package_version": version("ablate")}
    except PackageNotFoundError:
        return {"package_version": "unknown"}


@dataclass(frozen=True)
class Layout:
    """How the run is laid out over processes; part of the manifest and checked on resume."""

    world_size: int
    zero_stage: int
    expert_parallel: int
    precision: str

    def problems_loading(self, saved: dict) -> list[str]:
        """Why a checkpoint with manifest ``saved`` cannot be loaded by this layout."""
        out = []
        for key in ("zero_stage", "expert_parallel"):
            if saved.get(key) != getattr(self, key):
                out.append(f"{key} {saved.get(key)} in the checkpoint, {getattr(self, key)} now")
        # ZeRO 1-3 keep one optimizer partition per rank: they need the same world size.
        # Plain data parallel (stage 0) keeps whole states and resumes on any world size.
        if self.zero_stage > 0 and saved.get("world_size") != self.world_size:
            out.append(f"world size {saved.get('world_size')} in the checkpoint, {self.world_size} now "
                       f"(ZeRO stage {self.zero_stage} partitions the optimizer per rank)")
        return out


# ------------------------------------------------------------------ files


def file_entry(path: Path, checksum_max_bytes: float, sync: bool = True) -> dict:
    """``{"size", "sha256"}`` of a file (sha256 None above the threshold); fsyncs it."""
    size = path.stat().st_size
    digest = None
    with open(path, "rb") as f:
        if size <= checksum_max_bytes:
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            digest = h.hexdigest()
        if sync:
            os.fsync(f.fileno())  # flushes this file's dirty pages, whoever wrote them
    return {"size": size, "sha256": digest}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file, fsync it, rename it over, fsync the dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def relative_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def build_manifest(staging: Path, step: int, config: dict, layout: Layout,
                   entries: dict[str, dict], checksum_max_bytes: float) -> dict:
    """The manifest of a staged checkpoint: ``entries`` (reported by the ranks that wrote
    the files) completed by rank 0 for any other file in ``staging``."""
    files = {}
    for rel in relative_files(staging):
        if rel == MANIFEST:
            continue
        files[rel] = entries.get(rel) or file_entry(staging / rel, checksum_max_bytes)
    return {
        "format": FORMAT, "step": step, "tag": tag_of(step), "time": time.time(),
        "config_hash": config_hash(config), "config": config,
        "world_size": layout.world_size, "zero_stage": layout.zero_stage,
        "expert_parallel": layout.expert_parallel, "precision": layout.precision,
        "code": code_version(),
        "checksum": {"algorithm": "sha256", "max_bytes": checksum_max_bytes},
        "files": files,
    }


def read_manifest(tag_dir: Path) -> dict | None:
    try:
        m = json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def check_files(tag_dir: Path, manifest: dict, hash_share: tuple[int, int] | None = (0, 1)) -> list[str]:
    """What is wrong with ``tag_dir`` against its manifest: missing files and wrong sizes
    always; checksums of the files this rank hashes (``hash_share = (rank, world)``: every
    world-th file, so ranks split the reading), none when ``hash_share`` is None."""
    problems = []
    for i, (rel, entry) in enumerate(sorted(manifest["files"].items())):
        path = tag_dir / rel
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if size != entry.get("size"):
            problems.append(f"{rel} has {size} bytes, the manifest says {entry.get('size')}")
        elif hash_share and entry.get("sha256") and i % hash_share[1] == hash_share[0]:
            if file_entry(path, float("inf"), sync=False)["sha256"] != entry["sha256"]:
                problems.append(f"{rel} fails its sha256 checksum")
    return problems


def intact(tag_dir: Path) -> bool:
    """The cheap test (no hashing): a manifest for this tag whose files are all there with
    their sizes, or a legacy ``COMPLETE`` marker."""
    m = read_manifest(tag_dir)
    if m is None:
        return (tag_dir / COMPLETE).exists() and not (tag_dir / MANIFEST).exists()
    return m.get("tag") == tag_dir.name and not check_files(tag_dir, m, hash_share=None)


def checkpoint_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every ``step-*`` directory, oldest first, whatever its state."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(step_of(d.name), d.name) for d in Path(ckpt_dir).iterdir() if d.is_dir()]
    return sorted((s, n) for s, n in found if s is not None)


def valid_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint that passes :func:`intact`, oldest first."""
    return [(s, n) for s, n in checkpoint_tags(ckpt_dir) if intact(Path(ckpt_dir) / n)]


def config_diff(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    missing = object()
    out = []
    for k in keys:
        a, b = saved.get(k, missing), now.get(k, missing)
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{k}: {show(a)} -> {show(b)}")
    return out


# ------------------------------------------------------------------ publish and clean


def clean_stale(ckpt_dir: Path) -> list[str]:
    """Remove staging and moved-aside directories left by a save that was killed."""
    removed = []
    if Path(ckpt_dir).is_dir():
        for d in Path(ckpt_dir).iterdir():
            if d.is_dir() and d.name.startswith((STAGING_PREFIX, OLD_PREFIX)):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed


def publish(ckpt_dir: Path, staging: Path, manifest: dict) -> Path:
    """Write the manifest into ``staging``, rename it to its tag, point ``latest`` at it."""
    write_durable(staging / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    fsync_dir(staging)
    final = Path(ckpt_dir) / manifest["tag"]
    old = None
    if final.exists():  # the same step saved again (a resume from an older checkpoint)
        old = final.with_name(OLD_PREFIX + final.name)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staging.rename(final)
    fsync_dir(Path(ckpt_dir))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        write_durable(Path(ckpt_dir) / LATEST, manifest["tag"])
    except OSError as e:  # the checkpoint is in place; resume scans, it does not read `latest`
        print(f"[ablate] WARNING: {final} is saved but {ckpt_dir / LATEST} could not be updated: {e}",
              file=sys.stderr, flush=True)
    return final


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Keep the newest ``keep`` intact checkpoints; delete every step directory older than
    the oldest of them (intact or not). ``keep`` <= 0 keeps everything."""
    if keep <= 0:
        return []
    kept = valid_tags(ckpt_dir)[-keep:]
    if not kept:
        return []
    oldest = kept[0][0]
    gone = [n for s, n in checkpoint_tags(ckpt_dir) if s < oldest]
    for name in gone:
        shutil.rmtree(Path(ckpt_dir) / name, ignore_errors=True)
    return gone
