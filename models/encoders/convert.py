"""Load pretrained image-encoder weights from a local file into ``models.encoders.vit.ViT``.

Sources, and the layouts their state dicts have (any prefix in front of the tower is
found and stripped: ``visual.`` for a full open_clip model, ``vision_model.`` for a
full Hugging Face CLIP/SigLIP model, ``visual.trunk.`` for open_clip's timm towers,
``encoder.`` for an ablate VLM, deeper ones such as LLaVA's vision tower):

| format    | tower keys                                            | attention            |
|-----------|-------------------------------------------------------|----------------------|
| open_clip | conv1, class_embedding, positional_embedding, ln_pre, | fused in_proj_weight |
|           | transformer.resblocks.i.{ln_1,attn,ln_2,mlp}, ln_post |                      |
| timm      | patch_embed.proj, cls_token, pos_embed, norm_pre,     | fused qkv            |
|           | blocks.i.{norm1,attn,norm2,mlp.fc1,mlp.fc2}, norm     |                      |
| hf_clip   | embeddings.{patch_embedding,class_embedding,          | separate q/k/v_proj  |
| hf_siglip |   position_embedding}, pre_layrnorm (CLIP only),      |                      |
|           | encoder.layers.i.{layer_norm1,self_attn,mlp}, post_.. |                      |
| ablate    | our own names (a saved ViT, or ``encoder.`` of a VLM) | fused qkv            |

Notable choices:
- Each format is a table of key renames plus a few reshapes (class token, the class
  position split off the position table, q/k/v fused), so one comparison against our
  own state dict finds every missing key, leftover key and shape mismatch at once and
  reports them together, instead of failing on the first.
- Weights we deliberately do not use are skipped, not reported: blocks after the
  deepest feature layer, projection / pooling heads (CLIP ``proj``, SigLIP's MAP head,
  timm ``head``/``fc_norm``), the final norm when ours is not built, and everything
  outside the vision tower (text tower, logit scale).
- A checkpoint whose position grid differs from ours (another resolution) is resized
  with the same bicubic interpolation the ViT uses at run time; the class position
  is kept as is.
- Files are read with ``safetensors`` or ``torch.load(weights_only=True)``: no pickled
  code runs. Nothing is downloaded: ``path`` is a local file or directory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from models.encoders.vit import PRETRAINED_FORMATS, ViT, resize_pos_embed

# Files looked for in a directory, in order (Hugging Face first, then open_clip's names).
DIR_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
)
SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")

# Per format: keys (relative to the tower's prefix) whose presence identifies it.
SIGNATURES = {
    "open_clip": ("conv1.weight", "positional_embedding"),
    "timm": ("patch_embed.proj.weight",),
    "hf_clip": ("embeddings.patch_embedding.weight", "embeddings.class_embedding"),
    "hf_siglip": ("embeddings.patch_embedding.weight",),
    "ablate": ("patch_embed.weight", "pos_embed"),
}

_B = r"(\d+)"  # a block index in a key pattern
# (source pattern, our name): the plain renames of each format.
RENAMES = {
    "open_clip": [
        (r"conv1\.weight", "patch_embed.weight"),
        (r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
        (rf"transformer\.resblocks\.{_B}\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (rf"transformer\.resblocks\.{_B}\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
        (rf"transformer\.resblocks\.{_B}\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (rf"transformer\.resblocks\.{_B}\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (rf"transformer\.resblocks\.{_B}\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
        (rf"transformer\.resblocks\.{_B}\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.2.\2"),
        (r"ln_post\.(weight|bias)", r"norm.\1"),
    ],
    "timm": [
        (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
        (r"norm_pre\.(weight|bias)", r"norm_pre.\1"),
        (rf"blocks\.{_B}\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)", r"blocks.\1.\2.\3"),
        (rf"blocks\.{_B}\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
        (rf"blocks\.{_B}\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.2.\2"),
        (r"norm\.(weight|bias)", r"norm.\1"),
    ],
    "hf": [
        (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.\1"),
        (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
        (rf"encoder\.layers\.{_B}\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (rf"encoder\.layers\.{_B}\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (rf"encoder\.layers\.{_B}\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (rf"encoder\.layers\.{_B}\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
        (rf"encoder\.layers\.{_B}\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.2.\2"),
        (r"post_layernorm\.(weight|bias)", r"norm.\1"),
    ],
}
RENAMES["hf_clip"] = RENAMES["hf_siglip"] = RENAMES["hf"]

# Heads and buffers of the source that a patch-feature encoder never uses.
UNUSED = {
    "open_clip": r"proj|attn_pool(_contrastive)?\..*",
    "timm": r"head\..*|fc_norm\..*|attn_pool\..*",
    "hf_clip": r"head\..*|embeddings\.position_ids",
    "hf_siglip": r"head\..*|embeddings\.position_ids",
    "ablate": r"$^",
}


# ---------------------------------------------------------------- reading files


def checkpoint_file(path: str | Path, fmt: str = "auto") -> Path:
    """The file to read for ``path`` (a file, or a directory holding a known file name)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"pretrained={str(path)!r}: no such file or directory")
    names = DIR_FILES[4:] + DIR_FILES[:4] if fmt == "open_clip" else DIR_FILES
    for name in names:
        if (p / name).is_file():
            return p / name
    raise FileNotFoundError(f"pretrained={str(path)!r}: directory holds none of {', '.join(DIR_FILES)}")


def _numpy_globals() -> list:
    """numpy array reconstruction for ``weights_only`` loads: DeepSpeed checkpoints (ours
    included) store numpy RNG state next to the weights. Arrays are data, not code."""
    import numpy as np

    rebuild = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's _reconstruct, any version
    names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [*((rebuild, n) for n in names), np.ndarray, np.dtype, *dtypes]


class SafetensorsFiles(Mapping):
    """The tensors of one or more ``.safetensors`` files, each read only when asked for:
    taking the vision tower out of a full VLM checkpoint reads only the tower."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                self._file_of.update(dict.fromkeys(f.keys(), file))

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key) -> bool:
        return key in self._file_of

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _torch_load(file: Path):
    with torch.serialization.safe_globals(_numpy_globals()):
        try:  # mmap keeps a large checkpoint out of memory until its tensors are used
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            return torch.load(file, map_location="cpu", weights_only=True)


def _unwrap(obj) -> dict[str, Tensor]:
    """The flat tensor dict inside ``{"state_dict"|"model"|"module": ...}``, minus ``module.``."""
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        wrappers = ("state_dict", "model", "module")
        inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    while sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | Path, fmt: str = "auto") -> tuple[Mapping[str, Tensor], Path]:
    """Every tensor in the checkpoint at ``path`` (sharded HF checkpoints merged);
    safetensors are read lazily, ``torch.load`` files memory-mapped where possible."""
    file = checkpoint_file(path, fmt)
    files = [file]
    if file.name.endswith(".index.json"):
        files = [file.parent / s for s in sorted(set(json.loads(file.read_text())["weight_map"].values()))]
    if all(f.suffix == ".safetensors" for f in files):
        return SafetensorsFiles(files), file
    merged: dict[str, Tensor] = {}
    for f in files:
        merged.update(_unwrap(_torch_load(f)))
    return merged, file


# ---------------------------------------------------------------- format detection


def find_towers(sd: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """Every ``(format, prefix)`` whose signature keys are present in ``sd``."""
    found = []
    for fmt, (first, *rest) in SIGNATURES.items():
        for key in sd:
            if key == first or key.endswith("." + first):
                prefix = key[: len(key) - len(first)]
                if all(prefix + k in sd for k in rest) and not (
                    fmt == "hf_siglip" and prefix + "embeddings.class_embedding" in sd
                ):
                    found.append((fmt, prefix))
    return found


def pick_tower(sd: Mapping[str, Tensor], fmt: str, file: Path) -> tuple[str, str]:
    towers = find_towers(sd)
    chosen = towers if fmt == "auto" else [t for t in towers if t[0] == fmt]
    if len(chosen) == 1:
        return chosen[0]
    seen = ", ".join(f"{f} at prefix {p!r}" for f, p in towers) or "none"
    if not chosen:
        what = "no image-tower keys of a known format" if fmt == "auto" else f"no {fmt} image-tower keys"
        first = ", ".join(list(sd)[:5])
        raise ValueError(f"pretrained={str(file)!r}: {what} (found: {seen}; first keys: {first})")
    raise ValueError(f"pretrained={str(file)!r}: several image towers ({seen}); "
                     f"set pretrained_format or point at a file with one")


# ---------------------------------------------------------------- conversion


def _square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _split_positions(pos: Tensor, has_class: bool, src: str, out: dict) -> None:
    """A ``[1,]T,D`` table -> ``cls_pos`` (when it has a class row) and ``pos_embed``."""
    pos_TD = pos.reshape(-1, pos.shape[-1])
    if has_class:
        out["cls_pos"] = (pos_TD[:1].unsqueeze(0), f"{src}[0]")
        pos_TD = pos_TD[1:]
    out["pos_embed"] = (pos_TD.unsqueeze(0), f"{src}[1:]" if has_class else src)


def convert(sd: Mapping[str, Tensor], fmt: str) -> tuple[dict[str, tuple[Tensor, str]], list[str], list[str]]:
    """Source keys -> ``{our key: (tensor, source key)}``, plus unknown and unused keys."""
    out: dict[str, tuple[Tensor, str]] = {}
    unknown, unused = [], []
    rest = dict(sd)
    if fmt == "ablate":
        return {k: (v, k) for k, v in rest.items()}, [], []
    if fmt == "open_clip":
        if "class_embedding" in rest:
            out["cls_token"] = (rest.pop("class_embedding").reshape(1, 1, -1), "class_embedding")
        if "positional_embedding" in rest:
            _split_positions(rest.pop("positional_embedding"), True, "positional_embedding", out)
    elif fmt == "timm":
        has_cls = "cls_token" in rest
        if has_cls:
            out["cls_token"] = (rest.pop("cls_token"), "cls_token")
        if "pos_embed" in rest:
            pos = rest.pop("pos_embed")
            # timm's no_embed_class models keep no class row: tell by which part is square.
            with_row = has_cls and not _square(pos.shape[-2]) and _square(pos.shape[-2] - 1)
            _split_positions(pos, with_row, "pos_embed", out)
            if has_cls and not with_row:  # the class token gets no position at all
                out["cls_pos"] = (pos.new_zeros(1, 1, pos.shape[-1]), "(no class position)")
    else:  # hf_clip, hf_siglip
        has_cls = "embeddings.class_embedding" in rest
        if has_cls:
            out["cls_token"] = (rest.pop("embeddings.class_embedding").reshape(1, 1, -1),
                                "embeddings.class_embedding")
        if "embeddings.position_embedding.weight" in rest:
            _split_positions(rest.pop("embeddings.position_embedding.weight"), has_cls,
                             "embeddings.position_embedding.weight", out)
        q_key = rf"encoder\.layers\.{_B}\.self_attn\.q_proj\.(weight|bias)"
        for key in [k for k in rest if re.fullmatch(q_key, k)]:
            parts = [key.replace(".q_proj.", f".{n}_proj.") for n in "qkv"]
            if all(p in rest for p in parts):
                i, kind = re.fullmatch(q_key, key).groups()
                src = key.replace(".q_proj.", ".{q,k,v}_proj.")
                out[f"blocks.{i}.attn.qkv.{kind}"] = (torch.cat([rest.pop(p) for p in parts]), src)
    for key, value in rest.items():
        for pattern, ours in RENAMES[fmt]:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, ours, key)] = (value, key)
                break
        else:
            (unused if re.fullmatch(UNUSED[fmt], key) else unknown).append(key)
    return out, unknown, unused


def _listing(title: str, items: list[str], n: int = 5) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return f"\n  {title} ({len(items)}): " + "; ".join(items[:n]) + more


@torch.no_grad()
def load_pretrained(vit: ViT, path: str | Path, fmt: str = "auto") -> dict:
    """Load the checkpoint at ``path`` into ``vit``; returns what was done (for logs).

    Raises ``ValueError`` naming missing keys, unexpected keys and shape mismatches
    (with the detected format) when the checkpoint does not fit the encoder.
    """
    if fmt not in PRETRAINED_FORMATS:
        raise ValueError(f"pretrained_format={fmt!r} is not one of {', '.join(PRETRAINED_FORMATS)}")
    if any(p.is_meta for p in vit.parameters()):
        raise ValueError("pretrained: cannot load weights into an encoder built on the meta device")
    sd, file = read_state_dict(path, fmt)
    fmt, prefix = pick_tower(sd, fmt, file)
    tower = {k[len(prefix):]: sd[k] for k in sd if k.startswith(prefix)}  # reads the tower only
    mapped, unknown, unused = convert(tower, fmt)

    ours = vit.state_dict()
    n_built = len(vit.blocks)
    skipped, depth_note = len(unused), ""
    block_ids = {int(m.group(1)) for k in mapped if (m := re.match(r"blocks\.(\d+)\.", k))}
    if block_ids and max(block_ids) >= vit.depth:
        depth_note = f"\n  depth: checkpoint has {max(block_ids) + 1} blocks, encoder depth={vit.depth}"
    for key in list(mapped):
        m = re.match(r"blocks\.(\d+)\.", key)
        if (m and n_built <= int(m.group(1)) < vit.depth) or (key.startswith("norm.") and key not in ours):
            del mapped[key]  # a block after the deepest feature layer, or an unused final norm
            skipped += 1

    resized = None
    if "pos_embed" in mapped and "pos_embed" in ours:
        pos, src = mapped["pos_embed"]
        n_ckpt, n_ours = pos.shape[1], ours["pos_embed"].shape[1]
        if n_ckpt != n_ours and _square(n_ckpt) and pos.shape[2] == ours["pos_embed"].shape[2]:
            mapped["pos_embed"] = (resize_pos_embed(pos, (vit.grid_size, vit.grid_size)), src)
            resized = (math.isqrt(n_ckpt), vit.grid_size)

    missing = [k for k in ours if k not in mapped]
    unexpected = unknown + [
        f"{src} (as {k})" if src != k else k for k, (_, src) in mapped.items() if k not in ours
    ]
    mismatched = [
        f"{k}{f' (from {src})' if src != k else ''}: checkpoint {tuple(t.shape)}, ours {tuple(ours[k].shape)}"
        for k, (t, src) in mapped.items() if k in ours and t.shape != ours[k].shape
    ]
    if missing or unexpected or mismatched or depth_note:
        raise ValueError(
            f"pretrained={str(file)!r} (format {fmt}, prefix {prefix!r}) does not fit this encoder"
            + (_listing("missing", missing) if missing else "")
            + (_listing("unexpected", unexpected) if unexpected else "")
            + (_listing("shape mismatch", mismatched) if mismatched else "")
            + depth_note
        )
    vit.load_state_dict({k: t for k, (t, _) in mapped.items()}, strict=True)
    return {"file": str(file), "format": fmt, "prefix": prefix, "loaded": len(mapped),
            "skipped": skipped, "resized_grid": resized}


def check_pretrained(path: str | None, fmt: str) -> list[str]:
    """Cheap problems for config validation; messages start with the argument's name."""
    problems = []
    if fmt not in PRETRAINED_FORMATS:
        problems.append(f"pretrained_format={fmt!r} is not one of {', '.join(PRETRAINED_FORMATS)}")
    if path:
        try:
            file = checkpoint_file(path, fmt)
        except FileNotFoundError as e:
            problems.append(str(e))
        else:
            if not file.name.endswith(SUFFIXES):
                problems.append(f"pretrained={str(path)!r}: unsupported file type {file.suffix!r} "
                                f"(expected one of {', '.join(SUFFIXES)})")
    return problems
