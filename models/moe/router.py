"""Top-k softmax routing, the router's auxiliary losses and its statistics.

- ``Router`` is an ``nn.Linear(D, E)`` without bias (its state is ``router.weight``
  ``E,D``, the layout of Mixtral and MegaBlocks) whose forward returns a ``Routing``.
  Logits, softmax and the losses are computed in float32 whatever the parameter dtype
  (ST-MoE: routing in bf16 is a source of instability); the module is called, not
  read from, so ZeRO-3 gathers its weight like any other layer's.
- Each token keeps its ``k`` most probable experts. ``renormalize`` rescales their
  probabilities to sum 1 (Mixtral: a softmax over the top-k logits is the same
  thing); otherwise they stay the full-softmax probabilities (Switch, DeepSeek-V2).
- Load-balancing loss (Switch, MegaBlocks): ``E * sum_e f_e * P_e`` with ``f_e`` the
  fraction of the ``N*k`` routed (token, expert) pairs that went to expert e and
  ``P_e`` the mean router probability of e. It is 1 whenever the router's mean
  probability is uniform and reaches E when one expert takes everything.
- Router z-loss (ST-MoE): ``mean_tokens logsumexp(logits)^2``, which keeps the
  logits small.
- Both are returned unweighted; the MoE layer applies its weights.

Shape legend: N tokens, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Routing(NamedTuple):
    """Where each token goes and with what weight (all float32 except the ids)."""

    logits_NE: Tensor  # router logits
    probs_NE: Tensor  # softmax over all experts
    weights_Nk: Tensor  # gate weight of each chosen expert (renormalised if asked)
    experts_Nk: Tensor  # chosen expert ids (int64), most probable first
    counts_E: Tensor  # routed (token, expert) pairs per expert (int64), sums to N*k


class Router(nn.Linear):
    """Linear top-k softmax router.

    Args:
        dim: model width D.
        num_experts: number of routed experts E.
        top_k: experts per token k (1 <= k <= E).
        renormalize: rescale the chosen experts' probabilities to sum 1.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__(dim, num_experts, bias=False)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x_ND: Tensor) -> Routing:
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        probs_NE = logits_NE.softmax(dim=-1)
        weights_Nk, experts_Nk = probs_NE.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights_Nk = weights_Nk / weights_Nk.sum(dim=-1, keepdim=True)
        counts_E = torch.bincount(experts_Nk.flatten(), minlength=self.out_features)
        return Routing(logits_NE, probs_NE, weights_Nk, experts_Nk, counts_E)


def load_balance_loss(probs_NE: Tensor, counts_E: Tensor, top_k: int) -> Tensor:
    """Unweighted ``E * sum_e f_e * P_e`` (see the module docstring); 0 for no tokens."""
    N, E = probs_NE.shape
    if N == 0:
        return probs_NE.sum()  # a zero that keeps the graph
    f_E = counts_E.to(probs_NE.dtype) / (N * top_k)
    P_E = probs_NE.mean(dim=0)
    return E * torch.dot(f_E, P_E)


def z_loss(logits_NE: Tensor) -> Tensor:
    """Unweighted router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    if logits_NE.shape[0] == 0:
        return logits_NE.sum()
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


@torch.no_grad()
def router_stats(r: Routing, lb_loss: Tensor, z: Tensor, prefix: str) -> dict[str, Tensor]:
    """Detached per-layer statistics, keyed ``<prefix>/<name>``:

    - ``tokens_per_expert``: float vector ``E`` of routed (token, expert) pairs;
    - ``imbalance``: max / mean of those counts (1 = balanced, E = one expert takes all);
    - ``entropy``: mean entropy of the router distribution in nats (log E = uniform);
    - ``lb_loss`` / ``z_loss``: the unweighted losses.
    """
    counts = r.counts_E.float()
    mean = counts.mean().clamp_min(1e-9)
    log_probs = r.logits_NE.log_softmax(dim=-1)
    entropy = -(r.probs_NE * log_probs).sum(dim=-1).mean() if r.probs_NE.shape[0] else counts.new_zeros(())
    return {
        f"{prefix}/tokens_per_expert": counts,
        f"{prefix}/imbalance": counts.max() / mean,
        f"{prefix}/entropy": entropy,
        f"{prefix}/lb_loss": lb_loss.detach().float(),
        f"{prefix}/z_loss": z.detach().float(),
    }
