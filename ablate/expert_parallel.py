"""Expert parallelism (EP) for the torch MoE backend, applied from outside the model.

``deepspeed.expert_parallel = P`` shards every MoE layer's routed experts over an
expert-parallel group of P ranks: rank ``p`` of the group keeps experts
``p*L .. (p+1)*L - 1`` (``L = E / P``) and drops the others. Everything else (router,
shared experts, attention, ...) stays replicated and data-parallel as before.

How a forward runs (``ExpertParallelExperts.run_grouped``, the one method of
``models.moe.experts.Experts`` that touches expert weights):

1. Each rank routes its own tokens and sorts the (token, expert) pairs by global expert
   id, exactly as without EP. Experts of EP rank p are contiguous, so the sorted rows
   fall into P consecutive blocks, one per destination rank.
2. The per-expert counts are exchanged first (one small ``all_to_all_single``), so every
   rank knows how many rows it receives from each source for each of its experts; then
   the rows themselves travel with uneven split sizes (dropless: nothing is padded,
   capped or dropped).
3. The received rows (source-major) are regrouped expert-major, run through the local
   experts, put back in arrival order and returned by the reverse all-to-all.

``AllToAll`` is an autograd Function: its backward is the all-to-all with the split
sizes swapped, so the gradient of every row returns to the rank that sent it, and an
expert's weight gradient sums the contributions of the tokens of every rank.

Gradient scale. Each rank back-propagates the mean loss over its own tokens, and the
data-parallel average divides by the world size W. An expert's local gradient already
holds the sum over all W ranks' losses, so it must be summed over the ranks that hold
the same expert (the expert-data-parallel group, size W/P) and divided by W, not by
W/P. DeepSpeed does exactly this for parameters it knows to be expert parameters
(``engine._reduce_expert_gradients`` for ZeRO 0, ``average_tensor`` in ZeRO 1/2); it
knows them by ``param.allreduce = False`` and ``param.group_name = "ep_size_<P>"`` (the
tags of its own MoE layer, set here), by optimizer groups split with
``split_params_into_different_moe_groups_for_optimizer`` (``ablate.strategy``), and by
``engine.has_moe_layers``, which it sets only when it finds its own ``MoE`` modules;
``moe_engine`` hands ``deepspeed.initialize`` an engine that sets it for ours.

Load balancing. The router, its load-balance loss and its statistics see the rank's
own tokens only (local counts), exactly as data parallelism without EP does: EP changes
where the experts are computed, never what is computed. (A loss over the global batch's
counts would make EP=P differ from EP=1 at the same data-parallel size.)

Checkpoints. DeepSpeed writes the model file from rank 0 only, so on its own every rank
would get rank 0's experts back (the "identical expert checkpoints" failure).
``save_expert_shards`` writes one file per EP rank (by the first rank of its
expert-data-parallel group) holding that rank's expert tensors; ``load_expert_shards``
puts them back; ``merge_expert_shards`` rebuilds the full experts for a single-process
reader. Optimizer state is DeepSpeed's: per-EP-rank ``expp_rank_*`` files for ZeRO 0,
the per-rank ZeRO files (expert groups partitioned over the expert-data-parallel group)
for ZeRO 1/2. ZeRO 1/2 also restore their fp32 master weights per rank, but not the
model's copy (it stays rank 0's until the next step overwrites it, so the first step
after a resume would run on wrong experts): the shards put it right, and
``master_weight_mismatch`` checks the two agree. ZeRO 3 is not supported (DeepSpeed
refuses MoE layers other than its own AutoEP ones there; ``ablate.validate`` says so
first).

Shape legend: N tokens, D model dim, F expert hidden, E experts, L = E/P local experts,
P expert-parallel ranks, S routed rows sent, R rows received.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.moe.experts import Experts, grouped_swiglu
from models.moe.moe import MoE

SHARD_FILE = "expert_shard_ep{rank:03d}_of_{size:03d}.pt"


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel groups of size ``ep_size``."""
    return f"ep_size_{ep_size}"


# ------------------------------------------------------------------ all-to-all


class AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Send ``in_splits[p]`` rows of ``x`` to rank p of ``group``, receive ``out_splits[p]``
    rows from it; differentiable."""
    return AllToAll.apply(x, out_splits, in_splits, group)


# ------------------------------------------------------------------ the sharded experts


class ExpertParallelExperts(Experts):
    """The experts of one MoE layer that rank ``ep_rank`` of ``group`` keeps.

    Same parameter names as ``Experts`` (``w1``, ``w3`` ``L,F,D``; ``w2`` ``L,D,F``), holding
    global experts ``first .. first + L - 1``. ``num_experts`` stays the global E (what the
    router's counts index). Built from a full ``Experts`` (same weights on every rank, as
    a seeded build gives), whose other experts are then released.
    """

    def __init__(self, full: Experts, group, ep_size: int, ep_rank: int):
        # Experts.__init__ would allocate and randomly initialise E experts (drawing from
        # the global RNG); this takes the slice of an existing one instead.
        nn.Module.__init__(self)
        if type(full) is not Experts:
            raise TypeError(f"expert parallelism runs the torch backend's Experts, got {type(full).__name__}")
        if full.num_experts % ep_size:
            raise ValueError(f"num_experts={full.num_experts} is not divisible by expert_parallel={ep_size}")
        self.num_experts, self.dim, self.hidden = full.num_experts, full.dim, full.hidden
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank
        self.num_local = full.num_experts // ep_size
        self.first = ep_rank * self.num_local
        local = slice(self.first, self.first + self.num_local)
        for name in ("w1", "w3", "w2"):
            p = nn.Parameter(getattr(full, name).detach()[local].clone(),
                             requires_grad=getattr(full, name).requires_grad)
            # DeepSpeed's marks of an expert parameter (deepspeed.moe.experts.Experts sets
            # the same): reduce over the expert-data-parallel group named group_name.
            p.allreduce = False
            p.group_name = group_name(ep_size)
            setattr(self, name, p)

    def extra_repr(self) -> str:
        return (f"experts {self.first}..{self.first + self.num_local - 1} of {self.num_experts} "
                f"(ep rank {self.ep_rank} of {self.ep_size}), dim={self.dim}, hidden={self.hidden}")

    def run_grouped(self, x_SD: Tensor, counts_E: Tensor) -> Tensor:
        P, L = self.ep_size, self.num_local
        send_PL = counts_E.view(P, L).contiguous()  # rows for rank p's l-th expert
        recv_PL = torch.empty_like(send_PL)  # rows from rank p for my l-th expert
        dist.all_to_all_single(recv_PL, send_PL, group=self.group)
        counts = torch.stack([send_PL.sum(1), recv_PL.sum(1)]).tolist()  # one device sync
        send_P, recv_P = counts
        x_RD = all_to_all(x_SD, recv_P, send_P, self.group)
        # Arrived source-major ([p][l] blocks); the experts want expert-major ([l][p]).
        block_R = torch.repeat_interleave(torch.arange(P * L, device=x_RD.device), recv_PL.flatten())
        expert_major_R = (block_R % L) * P + block_R // L
        order_R = torch.argsort(expert_major_R, stable=True)
        y_sorted = grouped_swiglu(x_RD.index_select(0, order_R), recv_PL.sum(0).tolist(),
                                  self.w1, self.w3, self.w2)
        y_RD = torch.empty_like(y_sorted).index_copy(0, order_R, y_sorted)
        return all_to_all(y_RD, send_P, recv_P, self.group)


# ------------------------------------------------------------------ applying it


def expert_parallel_layers(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """``{module name: sharded experts}`` of every MoE layer under ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def apply_expert_parallel(model: nn.Module, ep_size: int) -> list[str]:
    """Shard every MoE layer's experts of ``model`` over expert-parallel groups of
    ``ep_size`` consecutive ranks; returns the names of the sharded expert modules
    (none for ``ep_size`` 1). Needs the process group (``ablate.dist.init``); creates
    DeepSpeed's expert and expert-data-parallel groups (``deepspeed.utils.groups``),
    which its engine then uses to reduce the expert gradients.

    Every rank must have built the same model (same seed): each keeps its slice of the
    same global experts.
    """
    if ep_size == 1:
        return []
    from deepspeed.utils import groups

    name = group_name(ep_size)
    # Idempotent: DeepSpeed keeps the groups per name and creates them once.
    groups._create_expert_and_data_parallel(ep_size)
    group = groups._get_expert_parallel_group(name)
    rank = dist.get_rank(group=group)
    sharded = []
    for module_name, module in list(model.named_modules()):
        if isinstance(module, MoE):
            if module.backend != "torch":
                raise ValueError(f"backend={module.backend!r}: expert parallelism is implemented for the "
                                 "torch backend only")
            module.experts = ExpertParallelExperts(module.experts, group, ep_size, rank)
            sharded.append(f"{module_name}.experts" if module_name else "experts")
    if not sharded:
        raise ValueError(f"expert_parallel={ep_size}: the model has no MoE layer to shard")
    return sharded


@torch.no_grad()
def gather_experts(model: nn.Module) -> None:
    """Undo ``apply_expert_parallel`` in place: every rank gets all experts back as plain
    ``Experts`` (all-gather over each EP group), e.g. to evaluate without collectives."""
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, ExpertParallelExperts):
            ep = module.experts
            with torch.device("meta"):
                full = Experts(ep.num_experts, ep.dim, ep.hidden)
            for name in ("w1", "w3", "w2"):
                local = getattr(ep, name).detach()
                parts = [torch.empty_like(local) for _ in range(ep.ep_size)]
                dist.all_gather(parts, local.contiguous(), group=ep.group)
                grad = getattr(ep, name).requires_grad
                setattr(full, name, nn.Parameter(torch.cat(parts), requires_grad=grad))
            module.experts = full


def grad_norm(model: nn.Module) -> Tensor:
    """Global L2 norm of the gradients of a model with sharded experts, after the
    data-parallel reduction: replicated gradients counted once, every expert's once
    (squared sums over each EP group; ranks of one expert-data-parallel group hold
    identical expert gradients)."""
    dense, expert, device = [], [], None
    for p in model.parameters():
        if p.grad is None:
            continue
        device = p.grad.device
        (expert if getattr(p, "allreduce", True) is False else dense).append(p.grad.float().square().sum())
    zero = torch.zeros((), device=device)
    dense_sq = torch.stack(dense).sum() if dense else zero
    expert_sq = torch.stack(expert).sum() if expert else zero
    layers = list(expert_parallel_layers(model).values())
    if layers:
        dist.all_reduce(expert_sq, group=layers[0].group)
    return (dense_sq + expert_sq).sqrt()


# ------------------------------------------------------------------ DeepSpeed engine


@functools.cache
def _moe_engine_class():
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertParallelEngine(DeepSpeedEngine):
        """DeepSpeed's engine, told that the model has MoE layers.

        DeepSpeed sets ``has_moe_layers`` only for its own ``deepspeed.moe.layer.MoE``
        modules, and everything expert-aware hangs off that flag: the expert gradient
        reduction of ZeRO 0, the expert groups given to the ZeRO 1/2 optimizer, the
        per-EP-rank optimizer files. Set right after DeepSpeed's own scan, before the
        optimizer and checkpointing are configured.
        """

        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            layers = expert_parallel_layers(self.module)
            if layers:
                self.has_moe_layers = True
                self.num_experts = [m.num_experts for m in layers.values()]

    return ExpertParallelEngine


@contextlib.contextmanager
def moe_engine():
    """Within it, ``deepspeed.initialize`` builds the engine that recognises sharded experts."""
    import deepspeed

    original = deepspeed.DeepSpeedEngine
    deepspeed.DeepSpeedEngine = _moe_engine_class()
    try:
        yield
    finally:
        deepspeed.DeepSpeedEngine = original


# ------------------------------------------------------------------ checkpoints


def shard_path(tag_dir: Path, ep_rank: int, ep_size: int) -> Path:
    return Path(tag_dir) / SHARD_FILE.format(rank=ep_rank, size=ep_size)


def _expert_params(model: nn.Module) -> tuple[dict[str, nn.Parameter], ExpertParallelExperts | None]:
    params, first = {}, None
    for name, m in expert_parallel_layers(model).items():
        first = first or m
        for p_name, p in m.named_parameters(recurse=False):
            params[f"{name}.{p_name}"] = p
    return params, first


def save_expert_shards(model: nn.Module, tag_dir: Path) -> Path | None:
    """Write this rank's expert tensors to ``tag_dir`` if it is the first rank of its
    expert-data-parallel group (one file per EP rank); returns the file written."""
    from deepspeed.utils import groups

    params, layer = _expert_params(model)
    if layer is None or groups._get_expert_data_parallel_rank(group_name(layer.ep_size)) != 0:
        return None
    path = shard_path(tag_dir, layer.ep_rank, layer.ep_size)
    torch.save({
        "ep_size": layer.ep_size, "ep_rank": layer.ep_rank,
        "experts": {n: [m.first, m.first + m.num_local, m.num_experts]
                    for n, m in expert_parallel_layers(model).items()},
        "tensors": {n: p.detach().cpu().clone() for n, p in params.items()},
    }, path)
    return path


@torch.no_grad()
def load_expert_shards(model: nn.Module, tag_dir: Path) -> None:
    """Copy this rank's saved expert tensors into ``model``."""
    params, layer = _expert_params(model)
    if layer is None:
        return
    path = shard_path(tag_dir, layer.ep_rank, layer.ep_size)
    if not path.exists():
        saved = sorted(p.name for p in Path(tag_dir).glob("expert_shard_*.pt"))
        raise FileNotFoundError(f"{path} is missing (expert shards there: {saved or 'none'}); "
                                f"the checkpoint was saved with another expert_parallel size or without EP")
    shard = torch.load(path, map_location="cpu", weights_only=True)
    if set(shard["tensors"]) != set(params):
        raise RuntimeError(f"{path} holds {sorted(shard['tensors'])}, the model has {sorted(params)}")
    for name, p in params.items():
        t = shard["tensors"][name]
        if t.shape != p.shape:
            raise RuntimeError(f"{path}: {name} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
        p.copy_(t.to(p.device, p.dtype))


@torch.no_grad()
def master_weight_mismatch(model: nn.Module) -> float:
    """Largest difference between each expert parameter and the optimizer's fp32 master
    copy of it, rounded to the parameter's dtype (ZeRO 1/2 and DeepSpeed's bf16 optimizer;
    0 where there is no separate master copy). Collective over each expert-data-parallel
    group: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    worst = 0.0
    for p in _expert_params(model)[0].values():
        master = safe_get_full_fp32_param(p)
        if master is not None and p.numel():
            worst = max(worst, float((master.to(p.dtype) - p).abs().max()))
    return worst


def merge_expert_shards(state: dict[str, Tensor], tag_dir: Path) -> dict[str, Tensor]:
    """A single-process state dict with full experts: ``state`` (e.g. DeepSpeed's model
    file, which holds rank 0's expert slices) with every expert tensor replaced by the
    concatenation of all EP ranks' shards in ``tag_dir``. Unchanged without shards."""
    files = sorted(Path(tag_dir).glob("expert_shard_ep*_of_*.pt"))
    if not files:
        return state
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    size = shards[0]["ep_size"]
    ranks = sorted(s["ep_rank"] for s in shards)
    if ranks != list(range(size)):
        raise FileNotFoundError(f"{tag_dir}: expert shards for EP ranks {ranks}, expected 0..{size - 1}")
    shards.sort(key=lambda s: s["ep_rank"])
    out = dict(state)
    for name in shards[0]["tensors"]:
        out[name] = torch.cat([s["tensors"][name] for s in shards])
    return out
