"""Shared fixtures: one tiny synthetic corpus per test session, the environment every
training subprocess gets, and helpers to compose configs and run the real CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed's CPU extensions live in the venv (built once by `make setup`); wandb
# stays offline and quiet; two threads is what the machines have.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A tiny corpus (the `tiny` preset) built once for the whole session."""
    from ablate.data.corpus import PRESETS, CorpusConfig, build_corpus

    out = tmp_path_factory.mktemp("corpus") / "synth"
    build_corpus(CorpusConfig(out=str(out), **PRESETS["tiny"]), progress=False)
    return out


def compose(*overrides: str):
    """Compose conf/train.yaml with overrides, as ablate-train would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import ablate.train  # noqa: F401  registers the schema and resolvers

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def run_cli(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with the repo's Python, capturing output; never raises on failure."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, *args] if args[0].startswith("-") else args
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_args(corpus: Path, runs: Path, *overrides: str, multirun: bool = False) -> list[str]:
    """`python -m ablate.train` arguments for the smoke experiment on the test corpus."""
    return ["-m", "ablate.train", *(["--multirun"] if multirun else []), "experiment=smoke",
            f"paths.data={corpus}", f"paths.runs={runs}", *overrides]
