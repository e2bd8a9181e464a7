"""Turn the model slots of a config into a ``models.vlm.VLM``.

Each slot is a ``_target_`` node with ``_partial_: true``; the arguments that depend
on other slots (the connector's input width, the decoder's vocabulary) are derived
here and passed in, never stored in the config.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

# Arguments that the builder supplies; a config that sets them is rejected.
DERIVED_ARGS = {
    "encoder": (),
    "connector": ("in_dim", "out_dim", "num_patches"),
    "decoder": ("vocab_size",),
}


def build_encoder(cfg: DictConfig):
    return instantiate(cfg.encoder)()


def build_connector(cfg: DictConfig, encoder, decoder_dim: int):
    return instantiate(cfg.connector)(
        in_dim=encoder.embed_dim, out_dim=decoder_dim, num_patches=encoder.num_patches()
    )


def build_decoder(cfg: DictConfig, vocab_size: int):
    return instantiate(cfg.decoder)(vocab_size=vocab_size)


def build_model(cfg: DictConfig, vocab_size: int, image_token_id: int):
    """Encoder, connector and decoder from ``cfg``, joined into a VLM."""
    from models.vlm import VLM

    encoder = build_encoder(cfg)
    decoder = build_decoder(cfg, vocab_size)
    connector = build_connector(cfg, encoder, decoder.dim)
    return VLM(encoder, connector, decoder, image_token_id=image_token_id)
