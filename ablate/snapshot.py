"""Code snapshots: a submitted job runs the code it was submitted with.

A SLURM job may start hours after ``ablate-train -m hydra/launcher=slurm ...`` returned,
and Python reads the sources only then. Editing the working tree in between would
silently change what the queued runs do. So, at submission, the sources the jobs need
(``ablate/``, ``models/``, ``sweeps/``, ``hydra_plugins/``, ``conf/``) are copied into
``<sweep dir>/.code/<content hash>/`` and the jobs import from there
(hydra_plugins/ablate_launcher.py puts it first on ``PYTHONPATH``).

Choices:

- Which files: in a git checkout, ``git ls-files --cached --others --exclude-standard``
  under those directories (tracked files plus new files not yet added, nothing ignored:
  no ``__pycache__``, no run outputs); elsewhere a walk of the directories without
  caches and hidden entries. What is copied is the working tree's content, so
  uncommitted edits go with the jobs; the manifest records the commit and whether the
  tree differed from it ("dirty").
- Where: named by a hash of the paths and contents, so resubmitting unchanged code
  reuses the snapshot and two sweeps never share a half-written one. It is written to a
  temporary directory and renamed into place (atomic on one filesystem; if another
  process won the race, its identical copy is kept).
- The manifest (``SNAPSHOT.json``) sits at the snapshot's root: a job finds out which
  code it runs by looking next to the ``ablate`` package it imported (:func:`describe`).

``python -m ablate.snapshot DEST`` makes a snapshot under ``DEST`` and prints its path,
for plain ``sbatch`` (slurm/train.sbatch reads it from ``ABLATE_CODE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("ablate", "models", "sweeps", "hydra_plugins", "conf")
"""Top-level directories a job imports or composes from."""
MANIFEST = "SNAPSHOT.json"
DISABLE_ENV = "ABLATE_SNAPSHOT"
"""``ABLATE_SNAPSHOT=0`` turns snapshots off (as ``hydra.launcher.snapshot=false`` does)."""


def source_root() -> Path:
    """The directory holding the ``ablate`` package this process imported."""
    import ablate

    return Path(ablate.__file__).resolve().parents[1]


def expose_hydra_plugins() -> None:
    """Make the repository's ``hydra_plugins`` (the ``ablate`` sweeper and launcher)
    discoverable when ``ablate-train`` runs from another directory.

    Hydra finds plugins by scanning the ``hydra_plugins`` namespace package on
    ``sys.path``. The editable install maps ``ablate``/``models``/``sweeps`` only, so
    outside the repository root the namespace would hold Hydra's own plugins alone.
    Appending (not prepending) the root keeps any earlier entry, e.g. a snapshot, first.
    """
    root = str(source_root())
    if (Path(root) / "hydra_plugins").is_dir() and root not in sys.path:
        sys.path.append(root)


def enabled(requested: bool = True) -> bool:
    return requested and os.environ.get(DISABLE_ENV, "1").lower() not in ("0", "false", "no", "off")


def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def git_state(root: Path) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` for the snapshotted directories."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(root, "status", "--porcelain", "--", *PACKAGES)
    return {"commit": commit.strip(), "dirty": bool(status and status.strip())}


def list_files(root: Path) -> list[str]:
    """Relative paths (POSIX) of the files to snapshot, sorted."""
    listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *PACKAGES)
    if listed is not None and listed.strip("\0"):
        # --cached also lists tracked files deleted from the tree; those are not copied.
        files = {f for f in listed.split("\0") if f and (root / f).is_file()}
    else:
        files = set()
        for top in PACKAGES:
            for dirpath, dirnames, filenames in os.walk(root / top):
                dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
                for name in filenames:
                    if not name.startswith(".") and not name.endswith((".pyc", ".pyo")):
                        files.add((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(files)


def content_hash(root: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0")
        h.update(hashlib.sha256((root / f).read_bytes()).digest())
    return h.hexdigest()[:16]


def create(dest: Path | str, root: Path | None = None) -> Path:
    """Snapshot ``root`` (default: :func:`source_root`) into ``dest/<hash>``; returns
    that directory. Reuses an existing snapshot of identical content."""
    root = (root or source_root()).resolve()
    dest = Path(dest).resolve()
    files = list_files(root)
    if not any(f.startswith("ablate/") for f in files):
        raise FileNotFoundError(f"no ablate/ sources under {root} to snapshot")
    target = dest / content_hash(root, files)
    if (target / MANIFEST).is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=dest))
    try:
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, tmp / f)
        previous = root / MANIFEST  # snapshotting a snapshot keeps its origin
        if previous.is_file():
            origin = json.loads(previous.read_text())
        else:
            origin = {"source": str(root), **git_state(root)}
        manifest = {"hash": target.name, "files": len(files), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    **{k: origin.get(k) for k in ("source", "commit", "dirty")}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; be as readable as the checkout
        try:
            tmp.rename(target)
        except OSError:  # another submission created it first: same content, keep theirs
            if not (target / MANIFEST).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def manifest(root: Path | None = None) -> dict | None:
    """The manifest of the snapshot the running code comes from; None for a working tree."""
    path = (root or source_root()) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def describe(root: Path | None = None) -> str:
    """One line for a job's log: which code this process runs (or what ``root`` holds)."""
    root = root or source_root()
    m = manifest(root)
    if m is None:
        g = git_state(root)
        where = f"working tree {root} (no snapshot)"
    else:
        g = m
        where = f"snapshot {root}"
    if g.get("commit"):
        where += f", git {g['commit'][:12]}{' + uncommitted changes' if g.get('dirty') else ''}"
    return where


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ablate.snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", help="directory to hold snapshots (one subdirectory per content hash)")
    args = parser.parse_args(argv)
    print(create(args.dest))


if __name__ == "__main__":
    main()
