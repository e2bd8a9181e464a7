"""Small model helpers shared by builders, logging and tests."""

from __future__ import annotations

from torch import nn


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared/tied tensors counted once, as ``parameters()`` does);
    with ``trainable_only`` only those with ``requires_grad``. Works on the meta device."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
