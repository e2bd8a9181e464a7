"""Typed configuration schema for ``ablate-train``.

The plain sections (train, optim, data, ...) are dataclasses registered in Hydra's
ConfigStore as the base of ``conf/train.yaml``: a typo'd key or a value of the wrong
type fails at composition, with Hydra naming the full key. The model slots (encoder,
connector, decoder) are ``_target_`` nodes whose schema is the target's constructor
signature; ``ablate.validate`` checks them against it.

Everything here is a serialisable value. Derived quantities (gradient accumulation,
tokens per image, learning-rate schedule) are computed in Python and printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PathsConfig:
    data: str = "data/synth"
    """Corpus directory written by ``ablate-data`` (shards, tokenizer.json)."""
    runs: str = "runs"
    """Root under which run and sweep directories are created."""


@dataclass
class SplitConfig:
    """Image splitting (high-resolution mode); geometry in ``ablate/data/splitting.py``."""

    grid: list[int] = field(default_factory=lambda: [1, 1])
    """Crops per image as [rows, cols], each at the encoder resolution; [1, 1] = no splitting."""
    overlap: int = 0
    """Pixels shared by neighbouring crops (Molmo-style); 0 = plain tiling (MM1)."""
    global_view: bool = False
    """Also feed the whole image resized to the encoder resolution, as the first view."""


@dataclass
class DataConfig:
    weights: dict[str, float] = field(
        default_factory=lambda: {"caption": 0.45, "interleaved": 0.45, "text": 0.10}
    )
    """Document sampling weight per stream (caption / interleaved / text), normalised to sum 1."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Image splitting into crops (+ global view): each image becomes V views."""
    seq_len: int = 256
    """Packed sequence length in tokens, image tokens included."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 256
    """Samples held in each stream's shuffle buffer."""


@dataclass
class OptimConfig:
    lr: Any = 1e-3
    """Peak learning rate: a number, ``law`` (MM1's published law at the decoder's
    non-embedding N) or ``law:/path/lr_law.json`` (a law from ``ablate-lr fit``); see
    ``ablate/lr.py``. Checked by ``ablate.validate``."""
    weight_decay: float = 0.1
    """AdamW weight decay in torch's convention (per step the weights shrink by the
    scheduled lr x weight_decay); 0.1 equals MM1's decoupled 0.1 x eta at any eta."""
    decoupled_weight_decay: float | None = None
    """Decay in the decoupled convention (not multiplied by the lr, MM1's lambda); when
    set it replaces weight_decay with decoupled_weight_decay / peak lr."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to the peak lr."""
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of the peak lr (MM1: 10%)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    precision: str = "fp32"
    """fp32 or bf16 (bf16 keeps fp32 master weights inside DeepSpeed)."""
    expert_parallel: int = 1
    """Expert-parallel size P: each MoE layer's routed experts are sharded over groups of P
    consecutive ranks (E/P each), tokens exchanged by all-to-all (``ablate/expert_parallel.py``);
    1 = every rank holds every expert. Needs ffn=moe (torch backend), P dividing the ranks
    and ffn.num_experts, and ZeRO stage 0, 1 or 2."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys merged last (advanced; not validated)."""


@dataclass
class LoggerConfig:
    backend: str = "wandb"
    """wandb or none (metrics.jsonl in the run directory is always written)."""
    project: str = "ablate"
    """wandb project."""
    mode: str = "offline"
    """wandb mode: offline (run files on disk, syncable later), online or disabled."""
    entity: str | None = None
    """wandb entity (team or user); None uses the default."""
    group: str | None = None
    """wandb group; None means the sweep name for multiruns, else the run's name."""
    tags: list[str] = field(default_factory=list)
    """Extra wandb tags (the run's overrides are always added)."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 16
    """Sequences per optimizer step = micro_batch_size x accumulation x ranks."""
    log_every: int = 10
    """Log (and print) every this many steps."""
    ckpt_every: int = 100
    """Save a checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints (0 = all); older ones are deleted only once
    the new one is in place."""
    deterministic: bool = True
    """Use torch deterministic algorithms (needed for bit-identical resume)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    init_from: str | None = None
    """Model weights to start from instead of a random init (an ``ablate-upcycle`` output
    directory or a state-dict file); ignored once the run has a checkpoint to resume."""
    preempt_signal: str = "USR2"
    """Signal that saves a checkpoint at the next step and requeues the job (ablate/preempt.py)."""
    max_requeues: int = 20
    """Requeues the preempt signal may ask for under SLURM (counted by SLURM_RESTART_COUNT);
    past it the run saves and exits without requeueing. 0: never requeue."""
    max_bad_steps: int = 5
    """Consecutive optimizer steps with a non-finite loss or gradient norm after which the
    run stops (status failed, last good checkpoint kept). Each such step is skipped on all
    ranks: no update, no scheduler step, gradients dropped (docs/checkpoints.md). 0: never stop."""
    checksum_max_mb: float = 1024
    """Checkpoint files up to this size (MiB) get a sha256 in the manifest and are hashed
    again on resume; larger files are verified by size only (hashing costs ~1 s/GB). 0:
    sizes only."""
    strict_resume: bool = True
    """Refuse to resume from a checkpoint whose experiment config (the resolved config
    minus paths, logging, evaluation and checkpointing keys) differs; False: warn and go on."""


@dataclass
class EvalConfig:
    at_end: bool = True
    """Evaluate after training and write results.json."""
    max_caption: int = 300
    """Caption eval samples (0 = skip)."""
    max_vqa: int = 500
    """VQA eval samples (0 = skip)."""
    max_text: int = 200
    """Held-out text documents for the text loss (0 = skip)."""
    batch_size: int = 32
    """Samples per generation / loss batch."""
    max_new_tokens: int = 32
    """Generation length limit for captions."""
    max_answer_tokens: int = 8
    """Generation length limit for VQA answers."""
    shots: list[int] = field(default_factory=lambda: [0, 4, 8])
    """In-context examples per prompt; every task is scored at each count (MM1: 0, 4, 8)."""
    seed: int = 0
    """Seed of the few-shot example draw; fixed apart from ``seed`` so every variant and
    every training seed is asked with the same examples."""
    benchmarks: dict[str, str] = field(default_factory=dict)
    """Converted benchmarks to evaluate on: name -> directory (``ablate-data convert``)."""
    max_benchmark: int = 0
    """Queries per benchmark (0 = all)."""
    every: int = 0
    """Also evaluate every this many training steps (0 = only at the end)."""
    kv_cache: bool = True
    """Generate with a KV cache (False: recompute the whole sequence per token)."""
    log_samples: int = 16
    """Queries per task whose predictions go to samples.json and the wandb table."""


@dataclass
class Config:
    name: str = "default"
    """Experiment name: first part of the run directory and wandb names."""
    seed: int = 0
    """Seed for model init, data order and dropout."""
    encoder: Any = MISSING
    """Image encoder (``_target_`` node, conf/encoder/)."""
    connector: Any = MISSING
    """Vision-language connector (``_target_`` node, conf/connector/)."""
    decoder: Any = MISSING
    """Language decoder (``_target_`` node, conf/decoder/)."""
    ffn: Any = MISSING
    """The decoder's FFN in each layer: dense or mixture-of-experts (``_target_`` node, conf/ffn/)."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# An absolute path for ``@hydra.main``: given a relative one, Hydra resolves it against
# the calling *module* when an app starts through a console script (``ablate-train``),
# and then looks for an importable package named ``conf``.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

MODEL_SLOTS = ("encoder", "connector", "decoder", "ffn")


def register_configs() -> None:
    """Register the schema so ``conf/train.yaml`` can name it in its defaults."""
    ConfigStore.instance().store(name="config_schema", node=Config)
