"""Rules of ``ablate.validate`` beyond shapes and types: settings that must be counts,
the corpus against the readers that share it, evaluation data, and the weights named
by ``train.init_from``. Each function returns problems, each naming its full key and
value and saying why (and, where there is one, the fix)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import signal
import typing
import zipfile
from pathlib import Path

from omegaconf import DictConfig

from ablate.config import Config
from ablate.data import format as fmt

UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


def _unknown_keys(node, schema: type, prefix: str) -> list[str]:
    """Keys of ``node`` that the dataclass ``schema`` lacks, recursing into nested
    dataclasses. Hydra's ``+key=value`` adds a key even to a struct node, so a typo
    given with ``+`` passes composition and is caught here."""
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    problems = []
    for key in node:
        full = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"did you mean {prefix}{near[0]}? " if near else ""
            problems.append(f"{full}: unknown key ({hint}accepted: {', '.join(sorted(fields))})")
        elif dataclasses.is_dataclass(hints.get(key)) and isinstance(node[key], DictConfig):
            problems += _unknown_keys(node[key], hints[key], f"{full}.")
    return problems


def check_schema_keys(cfg: DictConfig) -> list[str]:
    """Keys outside the typed schema (``ablate.config.Config``); the model slots (typed
    ``Any`` there) are checked against their targets' signatures by ``check_slot``."""
    return _unknown_keys(cfg, Config, "")


def _at_least(key: str, value, low: int, why: str = "") -> list[str]:
    """``key=value: must be >= low`` unless it is; ``why`` adds what the bound means."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low:
        return []
    return [f"{key}={value!r}: must be >= {low}" + (f" ({why})" if why else "")]


def check_counts(cfg: DictConfig) -> list[str]:
    """Intervals, counts and limits outside the batch arithmetic of ``check_training``
    (the ``eval`` section's are ``ablate.eval.tasks.benchmark_problems``)."""
    t, o = cfg.train, cfg.optim
    problems = _at_least("train.log_every", t.log_every, 1)
    problems += _at_least("train.ckpt_every", t.ckpt_every, 0, "0 = save only at the end")
    problems += _at_least("train.keep_checkpoints", t.keep_checkpoints, 0, "0 = keep every checkpoint")
    problems += _at_least("data.shuffle_buffer", cfg.data.shuffle_buffer, 0, "0 or 1 = no shuffling")
    if t.get("max_requeues") is not None:
        problems += _at_least("train.max_requeues", t.max_requeues, 0, "0 = never requeue")
    if not 0 <= cfg.seed < 2**32:
        problems.append(f"seed={cfg.seed}: must be in [0, 2**32) (numpy's seed range)")
    betas = list(o.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        problems.append(f"optim.betas={betas}: must be two numbers in [0, 1)")
    if not o.eps > 0:
        problems.append(f"optim.eps={o.eps}: must be > 0")
    problems += _at_least("optim.grad_clip", o.grad_clip, 0, "0 disables clipping")
    name = str(t.preempt_signal).upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if name not in signal.Signals.__members__ or name in UNCATCHABLE:
        problems.append(f"train.preempt_signal={t.preempt_signal!r}: not a signal a process can catch "
                        "(e.g. USR1, USR2, TERM)")
    return problems


def readers(world_size: int, num_workers: int) -> int:
    """Processes that each read the training shards: every rank's data-loader workers
    (a rank with ``num_workers=0`` reads in its training process)."""
    return world_size * max(1, num_workers)


def check_shards(cfg: DictConfig, world_size: int) -> list[str]:
    """Every reader (rank x data-loader worker) draws its own shards of each stream
    (``ablate/data/pipeline.py``); with fewer shards than readers, two readers start on
    the same shard and a global batch repeats samples. Each positive-weight stream needs
    at least one shard per reader."""
    root, nw = Path(cfg.paths.data), cfg.data.num_workers
    if not isinstance(nw, int) or nw < 0 or not (root / fmt.META_FILE).exists():
        return []  # reported by check_training / check_data
    need = readers(world_size, nw)
    try:
        counts = json.loads((root / fmt.META_FILE).read_text()).get("counts", {})
    except (OSError, ValueError):
        counts = {}
    problems = []
    for stream, w in cfg.data.weights.items():
        if stream not in fmt.STREAMS or not w > 0:
            continue
        have = len(fmt.list_shards(root, "train", stream))
        if not 0 < have < need:  # 0: reported by check_data
            continue
        samples = counts.get(f"train/{stream}")
        fixes = []
        if isinstance(samples, int) and samples >= need:
            fixes.append(f"rebuild the corpus with at least {need} shards per stream "
                         f"(ablate-data --shard-size {samples // need} or smaller)")
        if nw > 1 and have >= world_size:
            fixes.append(f"set data.num_workers={have // world_size} or fewer")
        fixes = fixes or ["use fewer ranks or a corpus with more samples"]
        problems.append(
            f"data.num_workers={nw}: stream {stream!r} (data.weights.{stream}={w}) has {have} train "
            f"shard(s) in {root}, fewer than its {need} readers (ranks x workers = {world_size} x "
            f"{max(1, nw)}); readers would share shards and repeat samples. Fix: "
            + " or ".join(fixes))
    return problems


def check_eval(cfg: DictConfig, check_paths: bool) -> list[str]:
    """The ``eval`` section (counts, shots, benchmarks: ``ablate/eval/tasks.py``) and,
    with ``check_paths``, the corpus's eval shards of every split it samples."""
    from ablate.eval.tasks import benchmark_problems

    return benchmark_problems(cfg) + (check_eval_data(cfg) if check_paths else [])


def check_eval_data(cfg: DictConfig) -> list[str]:
    """An evaluation at the end needs the corpus's eval shards of every split it samples."""
    root = Path(cfg.paths.data)
    if not cfg.eval.at_end or not (root / fmt.META_FILE).exists():
        return []
    problems = []
    for split in fmt.EVAL_SPLITS:
        n = cfg.eval.get(f"max_{split}")
        if isinstance(n, int) and n > 0 and not fmt.list_shards(root, "eval", split):
            problems.append(f"eval.max_{split}={n}: corpus {root} has no eval/{split} shards "
                            f"(set eval.max_{split}=0 or eval.at_end=false)")
    return problems


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a state-dict file, read without loading its tensors
    (safetensors: the header; torch zip files: memory-mapped). Raises ``ValueError``."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # a truncated or foreign file
            raise ValueError(f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise ValueError(f"not a readable torch state-dict file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("holds no plain state dict (a mapping of names to tensors)")
    return {k: tuple(v.shape) for k, v in state.items()}


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def check_init_from(cfg: DictConfig, parts) -> list[str]:
    """``train.init_from`` names a readable weights file or ``ablate-upcycle`` directory
    whose tensors fit the configured model, under ``ablate.weights.load_init``'s rules:
    every tensor exists in the model with its shape, and every component (encoder,
    connector, decoder) the file has tensors for is complete. ``parts``: the meta-device
    ``(encoder, connector, decoder)``, or None when the model could not be built."""
    from ablate.weights import STATE_FILE

    value = cfg.train.get("init_from")
    if not value:
        return []
    key, path = f"train.init_from={str(value)!r}", Path(value)
    if path.is_dir():
        if not (path / STATE_FILE).is_file():
            return [f"{key}: directory has no {STATE_FILE} (expected an ablate-upcycle output "
                    "directory or a state-dict file)"]
        path = path / STATE_FILE
    elif not path.is_file():
        return [f"{key}: no such file or directory (expected an ablate-upcycle output directory "
                "or a state-dict file; run ablate-upcycle first)"]
    try:
        shapes = _weight_shapes(path)
    except ValueError as e:
        return [f"{key}: {path} {e}"]
    if not shapes:
        return [f"{key}: {path} holds no tensors"]
    if parts is None:
        return []
    model = {f"{name}.{k}": tuple(v.shape)
             for name, part in zip(("encoder", "connector", "decoder"), parts)
             for k, v in part.state_dict().items()}
    present = {k.split(".", 1)[0] for k in shapes}
    unexpected = [k for k in shapes if k not in model]
    missing = [k for k in model if k not in shapes and k.split(".", 1)[0] in present]
    wrong = [f"{k} {list(shapes[k])} vs {list(model[k])}" for k in shapes
             if k in model and shapes[k] != model[k]]
    if not (unexpected or missing or wrong):
        return []
    return [f"{key}: the weights do not fit the configured model"
            + (f"; not in the model: {_few(unexpected)}" if unexpected else "")
            + (f"; missing: {_few(missing)}" if missing else "")
            + (f"; shape (file vs model): {_few(wrong)}" if wrong else "")
            + " (is the ffn/decoder config the one the weights were made for? see upcycled.yaml)"]

