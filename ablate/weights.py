"""Model weights as plain state-dict files: what ``ablate-upcycle`` and the Hugging
Face import write (safetensors) and what ``train.init_from`` loads into a freshly built
model before training starts (strict per component, see ``load_init``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

STATE_FILE = "model.safetensors"
"""The state-dict file inside an ``ablate-upcycle`` output directory."""


def save_state_dict(state: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Write ``state`` as safetensors; tied tensors (one storage under two names, a tied
    embedding) are written twice, as safetensors requires."""
    from safetensors.torch import save_file

    seen, plain = set(), {}
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        # A view into a larger buffer (ZeRO-3's consolidated weights) or a second name
        # for a storage already written: its own copy.
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        plain[key] = t
    save_file(plain, str(path), metadata={"format": "pt"})


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from ``path``: an ``ablate-upcycle`` directory, a ``.safetensors``
    file, or a torch file holding a plain state dict."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected an ablate-upcycle directory or a "
                                "state-dict file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_init(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Load weights for ``train.init_from`` and return the top-level components loaded.

    The key check is strict per component: every key in the file must exist in the
    model, and every component (``encoder``, ``connector``, ``decoder``) the file has
    keys for must be complete. A component the file has no keys for keeps its
    from-scratch init (a Hugging Face decoder brings no encoder)."""
    state = read_state_dict(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"train.init_from={path}: the weights do not fit the configured model: "
                         f"{e}") from None
    present = {k.split(".", 1)[0] for k in state}
    partial = [k for k in missing if k.split(".", 1)[0] in present]
    if unexpected or partial:
        def few(keys):
            return ", ".join(sorted(keys)[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        raise ValueError(
            f"train.init_from={path}: the weights do not fit the configured model"
            + (f"; not in the model: {few(unexpected)}" if unexpected else "")
            + (f"; missing: {few(partial)}" if partial else "")
            + " (is the ffn/decoder config the one the weights were made for? see upcycled.yaml)")
    return sorted(present)
