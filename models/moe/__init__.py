"""Mixture-of-experts FFNs for the decoder (``conf/ffn/``).

- ``router.py``: top-k softmax router, load-balancing and z-losses, router statistics;
- ``experts.py``: stacked SwiGLU experts and the reference dropless ``torch`` backend;
- ``megablocks.py``: the ``megablocks`` backend (CUDA, imported lazily) and the weight
  mapping between our layout and MegaBlocks';
- ``moe.py``: the ``MoE`` layer, ``active_params``, and the per-layer FFN factories
  ``DenseFFN`` / ``MoEFFN`` that ``conf/ffn/*.yaml`` name.
"""

from models.moe.experts import Experts
from models.moe.megablocks import MegaBlocksExperts
from models.moe.moe import MoE, DenseFFN, MoEFFN, active_params
from models.moe.router import Router, Routing, load_balance_loss, z_loss

__all__ = ["DenseFFN", "Experts", "MegaBlocksExperts", "MoE", "MoEFFN", "Router", "Routing",
           "active_params", "load_balance_loss", "z_loss"]
