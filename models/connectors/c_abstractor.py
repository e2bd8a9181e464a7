"""Honeybee's C-Abstractor (arXiv 2312.06742): convolutional blocks on the 2-D patch
grid, adaptive average pooling to ``sqrt(M) x sqrt(M)``, blocks again, MLP readout.

Notable choices:
- Blocks are RegNet-style residual bottlenecks (as Honeybee's): 1x1 conv, depthwise
  3x3 conv, optional squeeze-excitation, 1x1 conv, each conv followed by a LayerNorm
  over channels; SiLU activations; a 1x1 conv + norm shortcut where the width changes.
  The block convolutions are bias-free (each is followed by a norm with its own shift).
- The convolutions give the pooled tokens local context before and after pooling,
  which plain average pooling lacks (Honeybee's "locality preservation").
- A learnable position embedding is added to the patch features first. At another
  resolution it is bicubically resized to the new grid (as ViT position tables are),
  and adaptive pooling still yields ``num_tokens`` tokens.
- The readout is Linear, then (SiLU, Linear) x (mlp_depth - 1), its hidden size the
  decoder width.

Shape legend: B batch, N patches, D encoder width, G patch-grid side, S pooled side,
T image tokens (S*S), C hidden width, M model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import check_pool_grid, check_positive, patch_grid, square_side


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``B,C,H,W`` map."""

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return super().forward(x_BCHW.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_norm(c_in: int, c_out: int, kernel: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free convolution (same padding) followed by a channel LayerNorm."""
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, LayerNorm2d(c_out))


class SqueezeExcite(nn.Module):
    """Channel gate from the globally pooled map: ``x * sigmoid(up(silu(down(mean(x)))))``."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.down = nn.Conv2d(channels, reduced, 1)
        self.up = nn.Conv2d(reduced, channels, 1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        s_BC11 = x_BCHW.mean((2, 3), keepdim=True)
        return x_BCHW * torch.sigmoid(self.up(F.silu(self.down(s_BC11))))


class Bottleneck(nn.Module):
    """Residual bottleneck block ``silu(f(x) + shortcut(x))`` keeping the grid size.

    Args:
        c_in: input channels.
        c_out: output (and inner) channels.
        se_ratio: squeeze-excitation width as a fraction of ``c_in``; 0 disables it.
    """

    def __init__(self, c_in: int, c_out: int, se_ratio: float):
        super().__init__()
        self.conv1 = conv_norm(c_in, c_out)
        self.conv2 = conv_norm(c_out, c_out, kernel=3, groups=c_out)  # depthwise
        se = round(c_in * se_ratio)
        self.se = SqueezeExcite(c_out, se) if se > 0 else nn.Identity()
        self.conv3 = conv_norm(c_out, c_out)
        self.shortcut = conv_norm(c_in, c_out) if c_in != c_out else nn.Identity()

    def forward(self, x_BCHW: Tensor) -> Tensor:
        y = F.silu(self.conv1(x_BCHW))
        y = self.se(F.silu(self.conv2(y)))
        return F.silu(self.conv3(y) + self.shortcut(x_BCHW))


def stage(depth: int, c_in: int, c_out: int, se_ratio: float) -> nn.Sequential:
    """``depth`` bottlenecks; the first one changes the width."""
    return nn.Sequential(*(Bottleneck(c_in if i == 0 else c_out, c_out, se_ratio) for i in range(depth)))


class CAbstractor(nn.Module):
    """Conv blocks -> adaptive average pool to ``num_tokens`` -> conv blocks -> MLP.

    Args:
        in_dim: encoder feature size D (derived at build time from the encoder).
        out_dim: decoder model size M (derived at build time from the decoder).
        num_patches: patches N per image (derived at build time); a perfect square.
        num_tokens: image tokens T after pooling; a perfect square, at most ``num_patches``.
        hidden_dim: channels C of the convolutional blocks.
        depth: bottleneck blocks before and (again) after the pooling.
        mlp_depth: Linear layers in the readout (SiLU between them, hidden size ``out_dim``).
        se_ratio: squeeze-excitation width as a fraction of a block's input width; 0 = none.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_patches: int,
        num_tokens: int = 144,
        hidden_dim: int = 1024,
        depth: int = 3,
        mlp_depth: int = 2,
        se_ratio: float = 0.25,
    ):
        super().__init__()
        check_positive(in_dim=in_dim, out_dim=out_dim, num_patches=num_patches, num_tokens=num_tokens,
                       hidden_dim=hidden_dim, depth=depth, mlp_depth=mlp_depth)
        if not 0 <= se_ratio <= 1:
            raise ValueError(f"se_ratio={se_ratio} must be in [0, 1] (0 disables squeeze-excitation)")
        self.pool_side = check_pool_grid(num_tokens, num_patches, "c_abstractor")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_tokens = num_tokens
        grid = square_side(num_patches)
        self.pos_embed_1DGG = nn.Parameter(torch.empty(1, in_dim, grid, grid))
        nn.init.trunc_normal_(self.pos_embed_1DGG, std=0.02)
        self.stage1 = stage(depth, in_dim, hidden_dim, se_ratio)
        self.stage2 = stage(depth, hidden_dim, hidden_dim, se_ratio)
        readout: list[nn.Module] = [nn.Linear(hidden_dim, out_dim)]
        for _ in range(mlp_depth - 1):
            readout += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*readout)

    def pos_embed(self, grid: int) -> Tensor:
        """The position embedding at a ``grid x grid`` patch grid (resized if needed)."""
        pos_1DGG = self.pos_embed_1DGG
        if pos_1DGG.shape[-1] == grid:
            return pos_1DGG
        resized = F.interpolate(pos_1DGG.float(), size=(grid, grid), mode="bicubic", align_corners=False)
        return resized.to(pos_1DGG.dtype)

    def forward(self, feats_BND: Tensor) -> Tensor:
        x_BDGG = patch_grid(feats_BND)
        x_BDGG = x_BDGG + self.pos_embed(x_BDGG.shape[-1])
        x_BCGG = self.stage1(x_BDGG)
        x_BCSS = self.stage2(F.adaptive_avg_pool2d(x_BCGG, self.pool_side))
        return self.readout(x_BCSS.flatten(2).transpose(1, 2))  # B,T,M
