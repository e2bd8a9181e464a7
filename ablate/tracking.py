"""Run identity and metric logging.

Every run writes ``metrics.jsonl`` in its directory (rank 0), whatever the tracker:
it is what tests and ``ablate-compare`` read, and it survives without wandb. With
``logger.backend=wandb`` the same records go to wandb (offline by default), with
``id`` derived from the run directory and ``resume="allow"`` so that a restarted
job continues the same wandb run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ablate.files import write_text


def run_id(override_dirname: str) -> str:
    """Directory name for a run: readable overrides plus a short hash of them all."""
    if not override_dirname:
        return "default"
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", override_dirname)[:80]
    return f"{slug}-{digest}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ablate_run_id"):
        OmegaConf.register_new_resolver("ablate_run_id", run_id)


def wandb_id(name: str, run_dir: Path) -> str:
    """A stable wandb id (<= 64 chars, [a-z0-9-]) for a run directory."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    return f"{base}-{digest}"


def flatten(d, prefix: str = "") -> dict:
    """Nested dict to dotted keys (wandb groups and filters on these)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def override_config(overrides: list[str]) -> dict[str, str]:
    """``override.<key>`` -> value for each Hydra override (``+``/``++`` dropped, ``hydra.*``
    left out): wandb config keys the UI can group runs by, one per swept axis (the run's
    overrides hold them; ``ablate-compare`` tells the swept ones from the fixed ones)."""
    out = {}
    for item in overrides:
        key, sep, value = str(item).lstrip("+").partition("=")
        if sep and not key.startswith(("hydra.", "~")):
            out[f"override.{key}"] = value
    return out


class Tracker:
    """Rank 0 logs; other ranks get a tracker that does nothing."""

    def __init__(self, cfg: DictConfig, run_dir: Path, overrides: list[str], group: str,
                 enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self._trim(resume_step)
        if cfg.logger.backend == "wandb":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            name = f"{cfg.name}/{run_dir.name}"
            self.wandb = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                id=wandb_id(name, run_dir),
                name=name,
                group=cfg.logger.group or group,
                tags=[o[:64] for o in overrides] + list(cfg.logger.tags),
                config={**flatten(OmegaConf.to_container(cfg, resolve=True)),
                        **override_config(overrides)},
                dir=str(run_dir),
                mode=cfg.logger.mode,
                resume="allow",
            )

    def _trim(self, resume_step: int) -> None:
        # Records past the checkpoint we resume from belong to steps about to be
        # redone; keep the file a single consistent history.
        if not self.path.exists():
            return
        keep = [line for line, rec in _records(self.path) if rec.get("step", 0) <= resume_step]
        write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """A wandb table (PIL images become ``wandb.Image``); metrics.jsonl keeps scalars only.

        The images are also logged as a media list ``<key>_images`` captioned with the
        row's other cells: wandb's offline mode writes a table's images as the word
        "Image" (a known limitation of offline runs), while a media list keeps its files.
        """
        if self.wandb is None or not rows:
            return
        import wandb
        from PIL import Image

        data = [[wandb.Image(c) if isinstance(c, Image.Image) else c for c in row] for row in rows]
        media = [wandb.Image(c, caption=" | ".join(str(x) for x in row if not isinstance(x, Image.Image)))
                 for row in rows for c in row if isinstance(c, Image.Image)]
        record = {key: wandb.Table(columns=columns, data=data)}
        if media:
            record[f"{key}_images"] = media
        self.wandb.log(record, step=step)

    def summary(self, metrics: dict) -> None:
        if self.wandb is not None:
            for k, v in metrics.items():
                self.wandb.summary[k] = v

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class AuxWindow:
    """The decoder's per-micro-batch statistics (``moe/layer<i>/<name>``) over a log window.

    Scalars (imbalance, entropy, lb/z losses) are averaged over the window's
    micro-batches and then over ranks; vectors (``tokens_per_expert``) are summed over
    both, and the window's own load imbalance (max / mean of the summed counts) and
    per-expert load fractions are derived from the sums. One all-reduce per record.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float | list[float]] = {}
        self.n = 0

    def add(self, aux: dict[str, float | list[float]]) -> None:
        for key, value in aux.items():
            if isinstance(value, list):
                prev = self.sums.get(key, [0.0] * len(value))
                self.sums[key] = [a + b for a, b in zip(prev, value)]
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.n += 1

    def record(self, reduce) -> dict:
        """Window averages/sums reduced over ranks with ``reduce(values, mean=flags)``."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        flat, flags = [], []
        for key in keys:
            value = self.sums[key]
            vec = value if isinstance(value, list) else [value / self.n]
            flat += vec
            flags += [not isinstance(value, list)] * len(vec)
        reduced, out, i = reduce(flat, mean=flags), {}, 0
        for key in keys:
            value = self.sums[key]
            if isinstance(value, list):
                counts = reduced[i:i + len(value)]
                i += len(value)
                total = sum(counts)
                stem = key.rsplit("/", 1)[0]
                out[f"{stem}/expert_load"] = [c / total if total else 0.0 for c in counts]
                out[f"{stem}/imbalance_window"] = max(counts) * len(counts) / total if total else 0.0
            else:
                out[key] = reduced[i]
                i += 1
        self.sums, self.n = {}, 0
        return out


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    try:
        return float(v) if not isinstance(v, (int, str, bool)) else v
    except (TypeError, ValueError):
        return str(v)


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every complete line; a line cut short by a killed process (the
    last one, not valid JSON) is dropped rather than failing the reader or the resume."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [rec for _, rec in _records(path)]
