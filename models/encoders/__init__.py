"""Image encoders: map pixels ``B,C,H,W`` to patch features ``B,N,D``.

Each encoder exposes ``image_size``, ``embed_dim`` and ``num_patches(image_size)``.
"""
