"""Small building blocks shared by several model files.

- ``RMSNorm``: normalises in float32 and casts back, so bf16 training keeps a stable
  denominator.
- ``SwiGLU``: the gated FFN of Llama-family decoders, kept as its own module so an
  MoE layer can replace it one-for-one (upcycling copies ``w1/w2/w3`` into experts).
- ``rope_cos_sin`` / ``apply_rope``: rotary embeddings computed from explicit positions,
  in the "rotate half" layout used by Hugging Face Llama checkpoints, so their
  ``q_proj``/``k_proj`` weights load without a permutation. The inverse frequencies are
  computed on the fly (``head_dim / 2`` numbers) rather than stored as a buffer, so a
  module built on the meta device and materialised later has nothing to re-derive.
- ``mlp``: the Linear-GELU-...-Linear stack used by connectors.
- ``check_positive``: the argument checks whose messages start with the argument name
  (the config validator prefixes the group to form the full key).
- Connector helpers: ``square_side`` / ``check_pool_grid`` / ``patch_grid`` for square
  patch grids, and ``CrossAttention`` (multi-head, separate q/k/v/o so queries, keys
  and output may have different widths: learned-query pooling, Molmo's 2x2 pooling).

Shape legend: B batch, T sequence, H heads, E head dim, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_positive(**values: float | int | None) -> None:
    """Raise ``ValueError("<name>=<value> must be positive")`` for the first value <= 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value} must be positive")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction).

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, bias-free (Llama layout).

    Args:
        dim: input and output size.
        hidden: inner size.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down (the residual output)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_cos_sin(positions_BT: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Cos/sin tables ``B,1,T,E`` (float32) for the given integer positions."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions_BT.device, dtype=torch.float32) / head_dim
    )
    angles_BTe = positions_BT.float()[..., None] * inv_freq  # e = E/2
    angles_BTE = torch.cat([angles_BTe, angles_BTe], dim=-1)
    return angles_BTE.cos()[:, None], angles_BTE.sin()[:, None]


def apply_rope(x_BHTE: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs ``(x[i], x[i + E/2])`` by the position angle (rotate-half layout)."""
    x32 = x_BHTE.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).type_as(x_BHTE)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """``depth`` Linear layers with GELU between them; depth 1 is a single projection."""
    if depth == 1:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
    for _ in range(depth - 2):
        layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
    layers += [nn.GELU(), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- connector helpers
# Shape legend for these: B batch, N patches, G grid side, D width, Q queries, K keys.


def square_side(n: int) -> int | None:
    """``sqrt(n)`` when ``n`` is a perfect square, else None."""
    side = math.isqrt(n)
    return side if side * side == n else None


def check_pool_grid(num_tokens: int, num_patches: int, what: str) -> int:
    """Check that ``num_patches`` patches can be pooled to ``num_tokens`` tokens on a
    square grid; returns the pooled side. Messages start with the argument they blame."""
    if square_side(num_patches) is None:
        raise ValueError(f"num_patches={num_patches} must be a perfect square (patches form a square grid)")
    side = square_side(num_tokens)
    if side is None:
        raise ValueError(f"num_tokens={num_tokens} must be a perfect square ({what} pools to a "
                         f"sqrt x sqrt grid)")
    if num_tokens > num_patches:
        raise ValueError(f"num_tokens={num_tokens} exceeds num_patches={num_patches} "
                         f"({what} pools, it cannot add tokens)")
    return side


def patch_grid(x_BND: Tensor) -> Tensor:
    """Lay patch features ``B,N,D`` out as their square grid ``B,D,G,G`` (row-major)."""
    B, N, D = x_BND.shape
    G = square_side(N)
    if G is None:
        raise ValueError(f"expected a square patch grid, got N={N} patches")
    return x_BND.transpose(1, 2).reshape(B, D, G, G)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``B,Q,query_dim`` over keys/values ``B,K,kv_dim``
    (self-attention when both are the same tensor); separate biased q/k/v/o projections.

    Args:
        query_dim: width of the queries.
        kv_dim: width of the keys/values.
        heads: attention heads; must divide ``inner_dim``.
        inner_dim: width of the attention itself (defaults to ``query_dim``).
        out_dim: width of the output (defaults to ``query_dim``).
    """

    def __init__(self, query_dim: int, kv_dim: int, heads: int, inner_dim: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        inner_dim = inner_dim or query_dim
        if inner_dim % heads:
            raise ValueError(f"heads={heads} does not divide the attention width {inner_dim}")
        self.heads = heads
        self.q = nn.Linear(query_dim, inner_dim)
        self.k = nn.Linear(kv_dim, inner_dim)
        self.v = nn.Linear(kv_dim, inner_dim)
        self.o = nn.Linear(inner_dim, out_dim or query_dim)

    def forward(self, q_BQD: Tensor, kv_BKD: Tensor, key_mask_BK: Tensor | None = None) -> Tensor:
        """``key_mask_BK`` (bool, True = attend) hides keys, e.g. padding; every query
        needs at least one visible key."""
        B, Q, _ = q_BQD.shape
        K = kv_BKD.shape[1]
        h = self.heads

        def heads(x_BLD: Tensor, L: int) -> Tensor:  # B,L,h*E -> B,h,L,E
            return x_BLD.view(B, L, h, -1).transpose(1, 2)

        mask = None if key_mask_BK is None else key_mask_BK[:, None, None, :]
        out_BhQE = F.scaled_dot_product_attention(
            heads(self.q(q_BQD), Q), heads(self.k(kv_BKD), K), heads(self.v(kv_BKD), K), attn_mask=mask
        )
        return self.o(out_BhQE.transpose(1, 2).reshape(B, Q, -1))
