"""Routed SwiGLU experts, stacked, and the reference ("torch") way to run them.

Layout (what checkpoints, upcycling and the Mixtral export rely on):

- ``w1`` ``E,F,D`` (gate), ``w3`` ``E,F,D`` (up), ``w2`` ``E,D,F`` (down);
- expert e computes ``w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))``: exactly a
  ``models.layers.SwiGLU`` whose ``w1.weight``, ``w3.weight``, ``w2.weight`` are
  ``w1[e]``, ``w3[e]``, ``w2[e]``.

The torch backend is dropless: the ``N*k`` (token, expert) pairs are sorted by expert
(a stable sort, so ties keep token order), each expert runs one matmul chain over all
of its rows however many there are (no capacity factor, nothing dropped or padded),
and the outputs are put back in pair order and summed per token with the gate
weights. It runs on any device. The weights are split with ``unbind`` (one backward
node that stacks the E gradients) rather than indexed per expert, which would build
an ``E,F,D`` zero tensor per expert in the backward pass. ``run_grouped`` (rows sorted
by expert in, outputs in the same order out) is the only method that touches the
weights: expert parallelism, applied from ``ablate/``, overrides just that.

Shape legend: N tokens, D model dim, F expert hidden, E experts, k experts per token,
S = N*k routed pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.moe.router import Routing


class Experts(nn.Module):
    """``num_experts`` SwiGLU experts of width ``hidden``, run by the torch backend.

    Args:
        num_experts: E.
        dim: model width D.
        hidden: inner size F of each expert.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.hidden = hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # down (residual output)
        self.init_weights(0.02, 0.02)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        """Normal init; ``w2`` writes into the residual stream and gets ``residual_std``
        (the decoder passes its depth-scaled value, as for dense ``w2``)."""
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=residual_std)

    def params_per_expert(self) -> int:
        return 3 * self.hidden * self.dim

    def forward(self, x_ND: Tensor, r: Routing) -> tuple[Tensor, Tensor | None]:
        """``y_ND`` = sum over each token's chosen experts of gate weight x expert output.

        Returns ``(y_ND, lb_loss)``; ``lb_loss`` is None here (the MoE layer computes it
        from the routing); a backend that computes its own returns it instead.
        """
        N, D = x_ND.shape
        k = r.experts_Nk.shape[1]
        order_S = torch.argsort(r.experts_Nk.flatten(), stable=True)  # pairs grouped by expert
        x_SD = x_ND.index_select(0, order_S // k)  # pair s belongs to token s // k
        y_SD = self.run_grouped(x_SD, r.counts_E)
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_NkD = y_SD.index_select(0, inverse_S).view(N, k, D)
        # Combine in float32 (the gate weights are float32), then back to the input dtype.
        y_ND = (y_NkD * r.weights_Nk.unsqueeze(-1)).sum(dim=1)
        return y_ND.to(x_ND.dtype), None

    def run_grouped(self, x_SD: Tensor, counts_E: Tensor) -> Tensor:
        """Each row of ``x_SD`` through its expert: the rows come grouped by expert id,
        ``counts_E[e]`` of them for expert e, and the outputs keep that order.

        The only place the expert weights are used. Expert parallelism
        (``ablate/expert_parallel.py``) overrides it: rows travel to the rank that holds
        their expert and back, so the routing, sorting and combining above stay one code.
        """
        return grouped_swiglu(x_SD, counts_E.tolist(), self.w1, self.w3, self.w2)


def grouped_swiglu(x_SD: Tensor, counts: list[int], w1_EFD: Tensor, w3_EFD: Tensor, w2_EDF: Tensor) -> Tensor:
    """Rows grouped by expert (``counts[e]`` rows for expert e, ``len(counts)`` = E) through
    their expert's SwiGLU, in the same order; an expert with no rows costs nothing."""
    chunks = x_SD.split(counts)
    ys = [
        F.linear(F.silu(F.linear(xe, w1)) * F.linear(xe, w3), w2)
        for xe, w1, w3, w2 in zip(chunks, w1_EFD.unbind(0), w3_EFD.unbind(0), w2_EDF.unbind(0))
    ]
    return torch.cat(ys)
