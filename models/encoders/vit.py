"""Vision Transformer image encoder (ViT-B/16 ... ViT-H/14, SigLIP so400m, or any size),
trained from scratch or loaded from a local open_clip / timm / Hugging Face state dict
(``models/encoders/convert.py``; the builder calls it when ``pretrained`` is set).

Notable choices:
- One module covers the published families through a few switches instead of one
  class per source: ``class_token`` (CLIP and timm prepend a learned token that takes
  part in attention; SigLIP has none), ``pre_norm`` (CLIP's ``ln_pre`` after the
  position embeddings), ``act`` (``quick_gelu`` for OpenAI CLIP, ``gelu_tanh`` for
  SigLIP), ``patch_bias`` (CLIP's patch conv has no bias), ``norm_eps`` and ``mlp_dim``
  (SigLIP so400m's 4304 is no integer ratio of its width).
- The output is patch tokens only, ``B,N,D``: the class token is dropped, connectors
  consume the patch grid. Its position embedding is a separate ``cls_pos`` vector so
  that resizing the patch table for another resolution never touches it.
- ``feature_layer`` picks which block's output is returned (-2, the penultimate block,
  is what LLaVA and MM1 use). A list concatenates several blocks along the channel
  dimension in list order (Molmo), so ``embed_dim`` = width x number of layers.
  Blocks after the deepest feature layer are not built at all: they would be dead
  weights that never get a gradient (ZeRO and DDP dislike unused parameters).
- ``final_norm`` says whether the last block's features go through the final
  LayerNorm. Sources differ in what they call features: timm, open_clip and HF SigLIP
  (``last_hidden_state``) norm every token; OpenAI CLIP and HF CLIP norm only the
  pooled class token, so their patch tokens of the last block are un-normed. The norm
  exists only when it is used (``final_norm`` and the last block is a feature layer);
  intermediate blocks are never normed, as in every source's hidden states.
- Images at another resolution than ``image_size`` are accepted: the patch position
  table is bicubically resized to the new grid (``resize_pos_embed``, the same
  interpolation as Hugging Face's ``interpolate_pos_encoding``), which is also what
  the loader uses to fit a checkpoint's table to a new resolution.
- ``frozen=True`` turns off ``requires_grad`` and runs the tower without autograd, so
  no activations are kept for a backward pass that will never reach it.

Shape legend: B batch, C channels, H/W image height/width, N patches, T tokens (N plus
the class token), D width, G grid side (patches per row), F MLP hidden, h heads,
E head dim, L feature layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import check_positive

# Checkpoint layouts ``models.encoders.convert`` understands ("auto" detects one).
PRETRAINED_FORMATS = ("auto", "open_clip", "timm", "hf_clip", "hf_siglip", "ablate")


def resize_pos_embed(pos_1ND: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Bicubically resize a square ``1,N,D`` position table to a ``grid_hw`` grid."""
    n, d = pos_1ND.shape[1], pos_1ND.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} positions, which is not a square grid")
    if (side, side) == tuple(grid_hw):
        return pos_1ND
    pos_1DGG = pos_1ND.reshape(1, side, side, d).permute(0, 3, 1, 2)
    pos_1DHW = F.interpolate(pos_1DGG.float(), size=grid_hw, mode="bicubic", align_corners=False)
    return pos_1DHW.flatten(2).transpose(1, 2).to(pos_1ND.dtype)


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "quick_gelu": QuickGELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


class Attention(nn.Module):
    """Multi-head self-attention without masking (every token sees every token)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows: q, k, v, each split into heads
        self.proj = nn.Linear(width, width)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        qkv_3BhTE = self.qkv(x_BTD).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q_BhTE, k_BhTE, v_BhTE = qkv_3BhTE.unbind(0)
        out_BhTE = F.scaled_dot_product_attention(q_BhTE, k_BhTE, v_BhTE)
        return self.proj(out_BhTE.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](), nn.Linear(hidden, width))

    def forward(self, x_BTD: Tensor) -> Tensor:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        return x_BTD + self.mlp(self.norm2(x_BTD))


def resolve_layers(feature_layer: int | list[int], depth: int) -> list[int]:
    """Python-style block indices -> non-negative ones, checked against ``depth``."""
    # Any sequence counts as a list (Hydra passes a ListConfig when not converting).
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if not layers:
        raise ValueError("feature_layer=[] must name at least one block")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(
                f"feature_layer={feature_layer} is out of range for depth={depth} "
                f"(valid: {-depth}..{depth - 1})"
            )
    return [i % depth for i in layers]


class ViT(nn.Module):
    """Vision Transformer mapping pixels ``B,C,H,W`` to patch features ``B,N,D``.

    Args:
        image_size: training resolution (square); sets the position-embedding grid.
        patch_size: side of a square patch in pixels; must divide ``image_size``.
        width: embedding size of the blocks; must be divisible by ``heads``.
        depth: number of transformer blocks in the full (published) tower.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size as a multiple of ``width`` (ignored if ``mlp_dim``).
        in_chans: input image channels.
        feature_layer: block whose output is returned, python-style (-1 last, -2
            penultimate); a list concatenates those blocks' outputs along channels.
        frozen: disable gradients for all parameters and run without autograd.
        class_token: prepend a learned class token (CLIP/timm); dropped from the output.
        pre_norm: LayerNorm after adding position embeddings (CLIP's ``ln_pre``).
        act: MLP activation: "gelu", "quick_gelu" (OpenAI CLIP) or "gelu_tanh" (SigLIP).
        patch_bias: bias in the patch-embedding conv (timm/SigLIP yes, CLIP no).
        norm_eps: epsilon of every LayerNorm (CLIP 1e-5, timm/SigLIP 1e-6).
        mlp_dim: MLP hidden size; overrides ``mlp_ratio`` when set (so400m: 4304).
        final_norm: apply the final LayerNorm to the last block's features when the
            last block is a feature layer (timm/open_clip/SigLIP yes, HF CLIP no).
        pretrained: local checkpoint file or directory the builder loads after building.
        pretrained_format: layout of ``pretrained``: "auto", "open_clip", "timm",
            "hf_clip", "hf_siglip" or "ablate".
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        feature_layer: int | list[int] = -2,
        frozen: bool = False,
        class_token: bool = False,
        pre_norm: bool = False,
        act: str = "gelu",
        patch_bias: bool = True,
        norm_eps: float = 1e-5,
        mlp_dim: int | None = None,
        final_norm: bool = True,
        pretrained: str | None = None,
        pretrained_format: str = "auto",
    ):
        super().__init__()
        check_positive(
            image_size=image_size, patch_size=patch_size, width=width, depth=depth,
            heads=heads, mlp_ratio=mlp_ratio, in_chans=in_chans, norm_eps=norm_eps, mlp_dim=mlp_dim,
        )
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        if width % heads != 0:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r} is not one of {', '.join(ACTIVATIONS)}")
        if pretrained_format not in PRETRAINED_FORMATS:
            raise ValueError(
                f"pretrained_format={pretrained_format!r} is not one of {', '.join(PRETRAINED_FORMATS)}"
            )
        layers = resolve_layers(feature_layer, depth)
        hidden = mlp_dim if mlp_dim is not None else int(width * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an MLP hidden size of 0 for width={width}")

        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.grid_size = image_size // patch_size
        self.depth = depth
        self.feature_layer = feature_layer if isinstance(feature_layer, int) else list(feature_layer)
        self.feature_layers = layers  # non-negative block indices, in output order
        self.embed_dim = width * len(layers)
        self.frozen = frozen
        self.pretrained = pretrained
        self.pretrained_format = pretrained_format
        n_blocks = max(layers) + 1  # blocks up to and including the deepest feature layer

        self.patch_embed = nn.Conv2d(in_chans, width, patch_size, stride=patch_size, bias=patch_bias)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, width))
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, width))
        else:
            self.cls_token = self.cls_pos = None
        self.norm_pre = nn.LayerNorm(width, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(width, heads, hidden, act, norm_eps) for _ in range(n_blocks))
        # The final norm belongs to the last block's output only, and only if asked for.
        use_norm = final_norm and depth - 1 in layers
        self.norm = nn.LayerNorm(width, eps=norm_eps) if use_norm else nn.Identity()
        self.init_weights()
        if frozen:
            self.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch init: truncated-normal(0.02) weights and embeddings, zero biases,
        LayerNorm (1, 0)."""
        for p in (self.pos_embed, self.cls_token, self.cls_pos):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def num_patches(self, image_size: int | None = None) -> int:
        """Patches N for a square image of ``image_size`` (default: the configured one)."""
        size = self.image_size if image_size is None else image_size
        if size % self.patch_size != 0:
            raise ValueError(f"image_size={size} is not divisible by patch_size={self.patch_size}")
        return (size // self.patch_size) ** 2

    def forward(self, pixels_BCHW: Tensor) -> Tensor:
        B, _, H, W = pixels_BCHW.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image of {H}x{W} pixels is not divisible by patch_size={p}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x_BDGG = self.patch_embed(pixels_BCHW.to(self.patch_embed.weight.dtype))
            x_BND = x_BDGG.flatten(2).transpose(1, 2)
            x_BTD = x_BND + resize_pos_embed(self.pos_embed, (H // p, W // p))
            n_prefix = 0
            if self.cls_token is not None:
                cls_B1D = (self.cls_token + self.cls_pos).expand(B, -1, -1)
                x_BTD = torch.cat([cls_B1D, x_BTD], dim=1)
                n_prefix = 1
            x_BTD = self.norm_pre(x_BTD)
            taken: dict[int, Tensor] = {}
            for i, block in enumerate(self.blocks):
                x_BTD = block(x_BTD)
                if i in self.feature_layers:
                    taken[i] = x_BTD[:, n_prefix:]
            if self.depth - 1 in taken:
                taken[self.depth - 1] = self.norm(taken[self.depth - 1])
            feats_LBND = [taken[i] for i in self.feature_layers]
            return feats_LBND[0] if len(feats_LBND) == 1 else torch.cat(feats_LBND, dim=-1)
