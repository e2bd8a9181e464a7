"""Image splitting (high-resolution mode): one image -> ``V`` views at the encoder's resolution.

A fixed-resolution encoder sees more of a large image when the image is cut into
crops, each encoded on its own: MM1 (in SFT) feeds 4 sub-images plus the whole image
downscaled (5 x 144 = 720 tokens); Molmo uses up to 12 *overlapping* crops plus a
low-resolution global view. ``data.split`` (``ablate.config.SplitConfig``) selects
the layout; every consumer (the packer's placeholder runs, the training batches,
evaluation) derives its views from the functions here, so they cannot disagree.

Geometry. Encoder resolution ``S``, grid ``rows x cols``, overlap ``o`` (``0 <= o < S``),
stride ``s = S - o``. The image is resized (bicubic, aspect ratio not kept, like the
unsplit square resize) to the canvas the grid covers exactly::

    W = cols * s + o        H = rows * s + o

Crop ``(r, c)`` is ``canvas[r*s : r*s + S, c*s : c*s + S]``. The last crop of a row ends at
``(cols - 1) * s + S = cols * s + o = W``, so the crops cover the canvas with nothing
left over. Neighbours ``c`` and ``c + 1`` cover ``[c s, c s + S)`` and
``[(c+1) s, (c+1) s + S)``, which share ``c s + S - (c+1) s = S - s = o`` columns (rows
likewise). ``o = 0`` is MM1's plain tiling; ``grid = [1, 1]`` gives ``W = H = S``: no split.

Views, in order: the global view (the whole image resized to ``S``, identical to the
unsplit preprocessing) when enabled, then the crops in row-major order. Global first,
as LLaVA-NeXT and Molmo put the low-resolution view first: the model reads the whole
scene before its details. ``V = rows * cols + global_view``, and an image costs
``V x`` (tokens per view) placeholders in the text sequence.

Unlike Molmo, the tokens of overlapping margins are kept in every crop that covers
them (Molmo drops them so each patch appears once): simpler, and the token count
stays ``V x`` (tokens per view) whatever the overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["Split", "num_views", "canvas_size", "crop_origins", "split_problems", "resize_rgb",
           "image_views"]


def num_views(grid: tuple[int, int], global_view: bool) -> int:
    """``V = rows * cols`` crops, plus one for the global view."""
    rows, cols = grid
    return rows * cols + int(bool(global_view))


def canvas_size(grid: tuple[int, int], image_size: int, overlap: int) -> tuple[int, int]:
    """(height, width) the crop grid covers: ``rows * (S - o) + o`` by ``cols * (S - o) + o``."""
    rows, cols = grid
    stride = image_size - overlap
    return rows * stride + overlap, cols * stride + overlap


def crop_origins(grid: tuple[int, int], image_size: int, overlap: int) -> list[tuple[int, int]]:
    """(top, left) of every crop on the canvas, row-major; each crop is ``S x S``."""
    rows, cols = grid
    stride = image_size - overlap
    return [(r * stride, c * stride) for r in range(rows) for c in range(cols)]


def split_problems(grid, overlap, global_view, image_size: int | None) -> list[str]:
    """Problems of a ``data.split`` setting, each named by its key (empty = fine).

    ``image_size`` is the encoder resolution ``S`` (None when the encoder could not be
    built; the checks that need it are then left out).
    """
    problems = []
    grid = list(grid) if isinstance(grid, (list, tuple)) else grid
    if (not isinstance(grid, list) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        problems.append(f"data.split.grid={grid}: must be [rows, cols] of two integers >= 1 "
                        f"([1, 1] = no splitting)")
        grid = None
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
        problems.append(f"data.split.overlap={overlap}: must be an integer >= 0 (pixels)")
    elif image_size is not None and overlap >= image_size:
        problems.append(f"data.split.overlap={overlap}: must be smaller than the crop size "
                        f"encoder.image_size={image_size} (stride = image_size - overlap > 0)")
    if grid == [1, 1] and global_view:
        problems.append("data.split.global_view=true: with data.split.grid=[1, 1] the global view "
                        "would repeat the single crop; use a larger grid or set it false")
    return problems


def resize_rgb(img: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB, bicubic resize to ``height x width`` (skipped if already that size): uint8 H,W,3."""
    img = img.convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def image_views(img: Image.Image, image_size: int, grid: tuple[int, int], overlap: int,
                global_view: bool) -> np.ndarray:
    """The ``V`` views of one image, in the order of the module docstring: uint8 V,S,S,3."""
    S = image_size
    views = [resize_rgb(img, S, S)] if global_view else []
    if tuple(grid) == (1, 1):
        if not views:
            views.append(resize_rgb(img, S, S))
    else:
        canvas_HW3 = resize_rgb(img, *canvas_size(grid, S, overlap))
        views += [canvas_HW3[top:top + S, left:left + S] for top, left in crop_origins(grid, S, overlap)]
    return np.stack(views)


@dataclass(frozen=True)
class Split:
    """One ``data.split`` setting as a hashable, picklable value (DataLoader workers get a copy)."""

    grid: tuple[int, int] = (1, 1)
    """Crop grid (rows, cols); (1, 1) = no splitting."""
    overlap: int = 0
    """Pixels shared by neighbouring crops."""
    global_view: bool = False
    """Whether the whole image, resized to the encoder resolution, comes first."""

    @classmethod
    def from_config(cls, node) -> "Split":
        """From a ``data.split`` node (DictConfig, dict or SplitConfig); None = no splitting
        (run configs written before splitting existed)."""
        if node is None:
            return cls()
        get = node.get if hasattr(node, "get") else lambda k, d: getattr(node, k, d)
        grid = get("grid", (1, 1))
        return cls(tuple(int(g) for g in grid), int(get("overlap", 0)), bool(get("global_view", False)))

    @property
    def num_views(self) -> int:
        """Views per image ``V``."""
        return num_views(self.grid, self.global_view)

    def views(self, img: Image.Image, image_size: int) -> np.ndarray:
        """uint8 V,S,S,3 views of ``img``."""
        return image_views(img, image_size, self.grid, self.overlap, self.global_view)
