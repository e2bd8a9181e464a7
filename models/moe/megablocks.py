"""The "megablocks" backend: our experts run by MegaBlocks' dropless grouped-GEMM MLP.

MegaBlocks (databricks/megablocks) is CUDA-only, source-only and pins one torch
version per release, so it is imported lazily, on the first forward, and only here.
Install it into an environment that already has a CUDA torch without letting pip
replace that torch (see ``INSTALL_HINT``).

How it is wired, and why:

- Parameters stay ours (``experts.w1/w2/w3`` in the layout of ``experts.py``), so a
  checkpoint does not depend on the backend. MegaBlocks stores each expert matrix as
  ``E*F, D`` rows (``w1`` gate, ``v1`` up, ``w2`` down with ``w2[e]`` = our
  ``w2[e].T``); ``experts_to_megablocks`` gives those views (gate/up are free views,
  down is one transposed copy per forward) and ``torch.func.functional_call`` runs
  MegaBlocks' ``ParallelDroplessMLP`` on them, so gradients land on our parameters.
- Routing is ours (``router.py``), identical for both backends; MegaBlocks receives
  the router probabilities, gate weights and expert ids and does the permutation,
  the grouped GEMMs and the weighted un-permutation.
- Its ``Arguments`` are built here from our config, never stored in a config: SwiGLU
  (``mlp_type="glu"`` with ``activation_fn=silu``; the default would be tanh-GELU),
  ``mlp_impl="grouped"``, no bias, ``num_layers=1`` (one instance per MoE layer),
  ``fp16=False`` and ``bf16`` from our parameters' dtype (the default is fp16=True).
  Its own parameters are never used, so it is built on the meta device and
  allocates nothing; every tensor its forward makes follows the input's device.
- MegaBlocks appends ``(tokens_per_expert, scores)`` to a module-global list in every
  training forward. This backend clears that list before its call, reads the layer's
  loss with ``batched_load_balancing_loss`` right after it (``moe_loss_weight=1``:
  unweighted; the MoE layer applies ``lb_weight``), and clears it again, so nothing
  outlives one layer's forward, in training or eval. ``clear_megablocks_state`` does
  the same from the training loop once per micro-batch (for a forward that raised, or
  an activation-checkpoint recompute, which appends without anyone reading).
- Shared experts are ours too (plain ``SwiGLU``), not MegaBlocks' ``shared_expert``.

Shape legend: N tokens, D model dim, F expert hidden, E experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from models.moe.experts import Experts
from models.moe.router import Routing

INSTALL_HINT = (
    "ffn.backend=megablocks needs MegaBlocks (the `gpu` extra), which runs on CUDA GPUs only. "
    "Install it into an environment that already has a CUDA torch without letting pip replace "
    "that torch (every megablocks release pins one exact torch version): "
    "pip install --no-deps --no-build-isolation megablocks stanford-stk grouped_gemm "
    "(it builds CUDA extensions: nvcc must be present). On a CPU, use ffn.backend=torch."
)


def import_megablocks():
    """``(arguments, dmoe, moe)`` modules of megablocks.layers, or an ImportError saying
    how to install it."""
    try:
        from megablocks.layers import arguments, dmoe, moe
    except (ImportError, OSError) as e:  # OSError: a CUDA library it links against is missing
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e
    return arguments, dmoe, moe


def clear_megablocks_state() -> None:
    """Empty MegaBlocks' module-global load-balancing and z-loss lists, if it was
    imported at all (a no-op otherwise: this never imports it)."""
    moe = sys.modules.get("megablocks.layers.moe")
    if moe is not None:
        moe.clear_load_balancing_loss()
    router = sys.modules.get("megablocks.layers.router")
    if router is not None and hasattr(router, "clear_router_zloss"):
        router.clear_router_zloss()


# ------------------------------------------------------------------ weight layouts


def experts_to_megablocks(w1_EFD: Tensor, w2_EDF: Tensor, w3_EFD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Our stacked experts as MegaBlocks' ``(w1, v1, w2)``, each ``E*F, D``.

    ``w1``/``v1`` are views of our gate/up weights; ``w2`` is a transposed copy (its row
    block e is our ``w2[e].T``). Differentiable: gradients flow back to our tensors."""
    E, Fh, D = w1_EFD.shape
    return (w1_EFD.reshape(E * Fh, D), w3_EFD.reshape(E * Fh, D),
            w2_EDF.transpose(1, 2).reshape(E * Fh, D))


def experts_from_megablocks(w1: Tensor, v1: Tensor, w2: Tensor, num_experts: int
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``experts_to_megablocks``: ``(w1_EFD, w2_EDF, w3_EFD)``."""
    rows, D = w1.shape
    if rows % num_experts:
        raise ValueError(f"num_experts={num_experts} does not divide MegaBlocks' {rows} expert rows")
    Fh = rows // num_experts
    return (w1.reshape(num_experts, Fh, D), w2.reshape(num_experts, Fh, D).transpose(1, 2).contiguous(),
            v1.reshape(num_experts, Fh, D))


# Our MoE-layer keys -> MegaBlocks dMoE keys (shared experts are not mapped: ours stay ours).
_ROUTER_KEYS = ("router.weight", "router.layer.weight")


def to_megablocks_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One MoE layer's state dict (``router.weight``, ``experts.w1/w2/w3``) under
    MegaBlocks dMoE names and layout (``router.layer.weight``, ``experts.mlp.w1/v1/w2``).
    Other keys (``shared.*``) pass through unchanged."""
    out = {k: v for k, v in state.items() if not k.startswith(("router.", "experts."))}
    out[_ROUTER_KEYS[1]] = state[_ROUTER_KEYS[0]]
    w1, v1, w2 = experts_to_megablocks(state["experts.w1"], state["experts.w2"], state["experts.w3"])
    out.update({"experts.mlp.w1": w1.contiguous(), "experts.mlp.v1": v1.contiguous(), "experts.mlp.w2": w2})
    return out


def from_megablocks_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``to_megablocks_state`` (E is read from the router's rows)."""
    out = {k: v for k, v in state.items() if not k.startswith(("router.", "experts."))}
    router = state[_ROUTER_KEYS[1]]
    out[_ROUTER_KEYS[0]] = router
    w1, w2, w3 = experts_from_megablocks(state["experts.mlp.w1"], state["experts.mlp.v1"],
                                         state["experts.mlp.w2"], router.shape[0])
    out.update({"experts.w1": w1, "experts.w2": w2, "experts.w3": w3})
    return out


# ------------------------------------------------------------------ the backend


def megablocks_arguments(arguments_module, num_experts: int, top_k: int, dim: int, hidden: int,
                         dtype: torch.dtype):
    """MegaBlocks ``Arguments`` for one layer of our experts (see the module docstring)."""
    values = dict(
        hidden_size=dim, ffn_hidden_size=hidden, num_layers=1, bias=False, return_bias=False,
        activation_fn=F.silu, mlp_type="glu", mlp_impl="grouped", memory_optimized_mlp=False,
        moe_num_experts=num_experts, moe_top_k=top_k,
        moe_loss_weight=1.0, moe_lbl_in_fp32=True, moe_zloss_weight=0.0,
        moe_expert_model_parallelism=False,
        fp16=False, bf16=dtype == torch.bfloat16, device=torch.device("meta"),
    )
    # Fields differ between releases (z-loss arrived in 0.7): pass only those this one has.
    known = {f.name for f in dataclasses.fields(arguments_module.Arguments)}
    return arguments_module.Arguments(**{k: v for k, v in values.items() if k in known})


class MegaBlocksExperts(Experts):
    """Same parameters as ``Experts``; forward runs MegaBlocks' dropless grouped MLP."""

    def _megablocks(self, dtype: torch.dtype, top_k: int):
        """``(dropless MLP on meta, its Arguments, megablocks.layers.moe)``, built once per
        (dtype, k) and kept out of ``_modules``: no submodule, no parameters, no state."""
        arguments, dmoe, moe = import_megablocks()
        cached = self.__dict__.get("_mb")
        if cached is None or cached[0] != (dtype, top_k):
            args = megablocks_arguments(arguments, self.num_experts, top_k, self.dim, self.hidden, dtype)
            cached = self.__dict__["_mb"] = ((dtype, top_k), dmoe.ParallelDroplessMLP(args), args)
        return cached[1], cached[2], moe

    def forward(self, x_ND: Tensor, r: Routing) -> tuple[Tensor, Tensor | None]:
        N, D = x_ND.shape
        dtype = self.w1.dtype
        import_megablocks()  # the install hint comes first, wherever this runs
        if x_ND.device.type != "cuda":
            raise RuntimeError(f"ffn.backend=megablocks runs on CUDA only (input on {x_ND.device}); "
                               "use ffn.backend=torch here")
        if dtype != torch.bfloat16:
            raise RuntimeError(f"ffn.backend=megablocks needs bf16 parameters (its grouped GEMM is "
                               f"bf16-only), got {dtype}: train with deepspeed.precision=bf16")
        mlp, args, moe = self._megablocks(dtype, r.experts_Nk.shape[1])
        mlp.train(self.training)  # not a submodule: .train()/.eval() do not reach it
        w1, v1, w2 = experts_to_megablocks(self.w1, self.w2, self.w3)
        moe.clear_load_balancing_loss()
        try:
            y = torch.func.functional_call(
                mlp, {"mlp.w1": w1, "mlp.v1": v1, "mlp.w2": w2},
                (x_ND.to(dtype).contiguous().view(N, 1, D), r.probs_NE, r.weights_Nk.to(dtype),
                 r.experts_Nk),
            )
            lb = moe.batched_load_balancing_loss(args) if moe.get_load_balancing_loss() else None
        finally:
            moe.clear_load_balancing_loss()
        if isinstance(y, tuple):  # (out, bias) in releases that return a bias regardless
            y = y[0]
        return y.reshape(N, D), lb
