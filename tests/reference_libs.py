"""Importing the reference libraries (transformers, timm, open_clip) that tests compare
our models against, on machines where they would otherwise fail to import."""

from __future__ import annotations

import sys
import types


def allow_torchvision_import() -> None:
    """Let libraries that import torchvision load where the installed torchvision is a
    CUDA build next to a CPU torch: its fake-op registrations need the compiled ops,
    which such a build cannot load, and none of the code the tests use needs them."""
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, OSError):
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")


def import_reference_libraries():
    """open_clip, timm and transformers, importable (see ``allow_torchvision_import``)."""
    allow_torchvision_import()
    import open_clip.model
    import timm.models.vision_transformer
    import transformers

    return open_clip, timm, transformers


def import_transformers():
    """Just transformers (the Hugging Face decoder tests need nothing else)."""
    allow_torchvision_import()
    import transformers

    return transformers
