"""The mixture-of-experts FFN layer, and the per-layer FFN factories behind ``conf/ffn/``.

``MoE`` replaces a decoder block's SwiGLU one-for-one: it maps ``..., D`` to
``..., D`` and returns ``(y, aux_loss, aux)`` (the decoder sums ``aux_loss`` over
layers into the training loss and merges the ``aux`` dicts; nothing is kept in module
or global state):

- ``router`` (``router.py``): top-k softmax over E routed experts;
- ``experts`` (``experts.py``): E SwiGLU experts of their own width F (fine-grained
  experts: many small ones, e.g. Aria's 64 routed experts), run by a backend:
  ``torch`` (reference, dropless, any device) or ``megablocks`` (``megablocks.py``,
  CUDA); both hold the same parameters, so a checkpoint loads under either;
- ``shared`` (optional): ``num_shared`` always-on experts stored as one
  ``SwiGLU(D, num_shared * shared_hidden)``, which computes the same as the sum of
  ``num_shared`` separate SwiGLUs of width ``shared_hidden`` (their hidden units
  concatenated); absent when ``num_shared`` is 0;
- ``aux_loss = lb_weight * load_balance + z_weight * z_loss`` (float32 scalar) and
  ``aux``: detached router statistics keyed ``moe/layer<i>/<name>`` (see
  ``router.router_stats``), so merging layers never mixes them.

Per-layer loss terms are summed over MoE layers (Switch / ST-MoE). MegaBlocks' own
batched loss and Hugging Face Mixtral average over layers instead: their weight
corresponds to ours divided by the number of MoE layers.

The decoder builds each block's FFN by calling a factory ``ffn(layer_id, dim, hidden)``
(``hidden`` is the decoder's dense FFN width): ``DenseFFN`` (``ffn=dense``, today's
SwiGLU everywhere, same parameter names and init) or ``MoEFFN`` (``ffn=moe``: MoE in
the layers ``offset, offset + every, offset + 2*every, ...``; every other layer stays
a dense SwiGLU). MM1's "MoE in every 2nd layer" is ``every=2, offset=1``: layers 1, 3, 5...

Shape legend: N tokens, D model dim, E experts.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.layers import SwiGLU, check_positive
from models.moe.experts import Experts
from models.moe.megablocks import MegaBlocksExperts
from models.moe.router import Router, load_balance_loss, router_stats, z_loss
from models.utils import count_params

BACKENDS = {"torch": Experts, "megablocks": MegaBlocksExperts}


def check_moe_args(num_experts: int, top_k: int, expert_hidden: int | None, num_shared: int,
                   shared_hidden: int | None, lb_weight: float, z_weight: float, backend: str) -> None:
    """Raise ``ValueError("<arg>=<value> ...")`` for the first bad argument."""
    check_positive(num_experts=num_experts, expert_hidden=expert_hidden, shared_hidden=shared_hidden)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    for name, value in (("num_shared", num_shared), ("lb_weight", lb_weight), ("z_weight", z_weight)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {sorted(BACKENDS)}")


class MoE(nn.Module):
    """Mixture-of-experts SwiGLU FFN returning ``(y, aux_loss, aux)``.

    Args:
        dim: model width D.
        num_experts: routed experts E.
        top_k: routed experts per token.
        expert_hidden: inner size F of each routed expert.
        num_shared: always-on shared experts (0 = none).
        shared_hidden: inner size of each shared expert (defaults to ``expert_hidden``).
        renormalize: rescale each token's top-k gate weights to sum 1.
        lb_weight: weight of the load-balancing loss (MM1: 0.01).
        z_weight: weight of the router z-loss (MM1: 0.001).
        backend: ``torch`` or ``megablocks``.
        layer_id: the decoder layer this sits in; names the ``aux`` keys.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, expert_hidden: int, num_shared: int = 0,
                 shared_hidden: int | None = None, renormalize: bool = True, lb_weight: float = 0.01,
                 z_weight: float = 0.001, backend: str = "torch", layer_id: int = 0):
        super().__init__()
        check_positive(dim=dim)
        check_moe_args(num_experts, top_k, expert_hidden, num_shared, shared_hidden, lb_weight, z_weight,
                       backend)
        self.num_experts = num_experts
        self.top_k = top_k
        self.lb_weight = lb_weight
        self.z_weight = z_weight
        self.backend = backend
        self.layer_id = layer_id
        self.router = Router(dim, num_experts, top_k, renormalize)
        self.experts = BACKENDS[backend](num_experts, dim, expert_hidden)
        self.shared = SwiGLU(dim, num_shared * (shared_hidden or expert_hidden)) if num_shared else None

    def active_params(self) -> int:
        """Parameters one token uses: router, shared experts and k of the E routed experts."""
        idle = self.experts.params_per_expert() * (self.num_experts - self.top_k)
        return count_params(self) - idle

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        routing = self.router(x_ND)
        y_ND, lb = self.experts(x_ND, routing)
        if lb is None:
            lb = load_balance_loss(routing.probs_NE, routing.counts_E, self.top_k)
        z = z_loss(routing.logits_NE)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        aux_loss = self.lb_weight * lb + self.z_weight * z
        aux = router_stats(routing, lb, z, prefix=f"moe/layer{self.layer_id}")
        return y_ND.view(shape), aux_loss, aux


def active_params(model: nn.Module) -> int:
    """Parameters used per token: all of ``model``'s (tied ones once) except that a
    submodule with its own ``active_params()`` (an ``MoE`` layer: ``N_dense + N_router +
    N_shared + N_experts * k / E``) reports its share itself."""
    own = getattr(model, "active_params", None)
    if callable(own):
        return int(own())
    total = count_params(model)

    def idle(module: nn.Module) -> int:
        n = 0
        for child in module.children():
            counted = getattr(child, "active_params", None)
            n += count_params(child) - int(counted()) if callable(counted) else idle(child)
        return n

    return total - idle(model)


# ------------------------------------------------------------------ conf/ffn factories


class DenseFFN:
    """``ffn=dense``: a ``SwiGLU(dim, hidden)`` in every layer (the plain decoder)."""

    def __call__(self, layer_id: int, dim: int, hidden: int) -> nn.Module:
        return SwiGLU(dim, hidden)

    def moe_layers(self, n_layers: int) -> list[int]:
        return []

    def check_depth(self, n_layers: int) -> None:
        """Nothing depends on the depth."""


class MoEFFN:
    """``ffn=moe``: an ``MoE`` in layers ``offset, offset + every, ...``, dense SwiGLU elsewhere.

    Args:
        num_experts: routed experts per MoE layer.
        top_k: routed experts per token.
        expert_hidden: inner size of each routed expert; None = the decoder's dense FFN
            width (each expert the size of the dense FFN, as in upcycling); smaller
            values give fine-grained experts.
        num_shared: always-on shared experts per MoE layer (0 = none).
        shared_hidden: inner size of each shared expert; None = the routed experts'.
        every: put an MoE in every this-many layers.
        offset: the first MoE layer (0-based); ``every=2, offset=1`` = layers 1, 3, 5...
        renormalize: rescale each token's top-k gate weights to sum 1 (Mixtral).
        lb_weight: load-balancing loss weight, per MoE layer (MM1: 0.01).
        z_weight: router z-loss weight, per MoE layer (MM1: 0.001).
        backend: ``torch`` (reference, runs anywhere) or ``megablocks`` (CUDA, bf16).
    """

    def __init__(self, num_experts: int = 8, top_k: int = 2, expert_hidden: int | None = None,
                 num_shared: int = 0, shared_hidden: int | None = None, every: int = 1, offset: int = 0,
                 renormalize: bool = True, lb_weight: float = 0.01, z_weight: float = 0.001,
                 backend: str = "torch"):
        check_moe_args(num_experts, top_k, expert_hidden, num_shared, shared_hidden, lb_weight, z_weight,
                       backend)
        check_positive(every=every)
        if offset < 0:
            raise ValueError(f"offset={offset} must be >= 0")
        self.num_experts = num_experts
        self.top_k = top_k
        self.expert_hidden = expert_hidden
        self.num_shared = num_shared
        self.shared_hidden = shared_hidden
        self.every = every
        self.offset = offset
        self.renormalize = renormalize
        self.lb_weight = lb_weight
        self.z_weight = z_weight
        self.backend = backend

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.offset and (layer_id - self.offset) % self.every == 0

    def moe_layers(self, n_layers: int) -> list[int]:
        return [i for i in range(n_layers) if self.is_moe_layer(i)]

    def check_depth(self, n_layers: int) -> None:
        """Raise if a decoder of ``n_layers`` would get no MoE layer at all."""
        if not self.moe_layers(n_layers):
            raise ValueError(f"offset={self.offset} leaves no MoE layer in a {n_layers}-layer decoder "
                             f"(MoE layers are offset, offset + every, ...; every={self.every})")

    def __call__(self, layer_id: int, dim: int, hidden: int) -> nn.Module:
        if not self.is_moe_layer(layer_id):
            return SwiGLU(dim, hidden)
        return MoE(dim, self.num_experts, self.top_k, self.expert_hidden or hidden, self.num_shared,
                   self.shared_hidden, self.renormalize, self.lb_weight, self.z_weight, self.backend,
                   layer_id=layer_id)
