"""Vision-language connectors: map patch features ``B,N,D_enc`` to ``B,T,D_model``.

Each connector takes ``in_dim``, ``out_dim`` and ``num_patches`` (derived at build time)
and exposes ``num_tokens`` (T, the image tokens per image it produces).
"""
