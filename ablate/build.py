"""Turn the model slots of a config into a ``models.vlm.VLM``.

Each slot is a ``_target_`` node with ``_partial_: true``; the arguments that depend
on other slots (the connector's input width, the decoder's vocabulary) are derived
here and passed in, never stored in the config.

Two slots may reach into another at build time, by config keys with a fixed meaning:

- ``connector.encoder_layers`` (e.g. Molmo's two ViT layers) is passed to the encoder
  as its ``feature_layer``: the connector variant owns which features it consumes.
- ``decoder.vocab_size`` may be set by a full-size preset (a published model's
  vocabulary, for parameter counting); when absent, the tokenizer's size is used.
- ``encoder.pretrained`` is loaded into the built encoder unless it was built on the
  meta device (validation, parameter counting).
"""

from __future__ import annotations

import inspect

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# Arguments that the builder supplies; a config that sets them is rejected.
DERIVED_ARGS = {
    "encoder": (),
    "connector": ("in_dim", "out_dim", "num_patches", "decoder_layers"),
    "decoder": (),
}


def encoder_overrides(cfg: DictConfig) -> dict:
    """Encoder arguments that the chosen connector decides (``connector.encoder_layers``)."""
    layers = cfg.connector.get("encoder_layers") if isinstance(cfg.connector, DictConfig) else None
    if layers is None:
        return {}
    return {"feature_layer": OmegaConf.to_object(layers) if OmegaConf.is_config(layers) else layers}


def build_encoder(cfg: DictConfig):
    encoder = instantiate(cfg.encoder)(**encoder_overrides(cfg))
    path = getattr(encoder, "pretrained", None)
    if path and not any(p.is_meta for p in encoder.parameters()):
        from models.encoders.convert import load_pretrained

        load_pretrained(encoder, path, getattr(encoder, "pretrained_format", "auto"))
    return encoder


def build_connector(cfg: DictConfig, encoder, decoder):
    """The connector, given the widths it joins (and the decoder's depth if it asks:
    a connector that adds layers inside the decoder, like hyper-attention)."""
    factory = instantiate(cfg.connector)
    kwargs = dict(in_dim=encoder.embed_dim, out_dim=decoder.dim, num_patches=encoder.num_patches())
    if "decoder_layers" in inspect.signature(factory.func).parameters:
        kwargs["decoder_layers"] = decoder.n_layers
    return factory(**kwargs)


def decoder_vocab_size(cfg: DictConfig, tokenizer_vocab: int | None) -> int:
    """The decoder's vocabulary: ``decoder.vocab_size`` if set, else the tokenizer's."""
    configured = cfg.decoder.get("vocab_size")
    if configured is not None:
        return int(configured)
    if tokenizer_vocab is None:
        raise ValueError("vocab_size: not set and no tokenizer to take it from "
                         "(set decoder.vocab_size or point paths.data at a corpus)")
    return tokenizer_vocab


def build_decoder(cfg: DictConfig, vocab_size: int | None):
    """The decoder, with each block's FFN built by the ``ffn`` slot's factory (dense or
    MoE, ``conf/ffn/``); a config without an ``ffn`` slot (older runs) gets dense FFNs."""
    kwargs = {"vocab_size": decoder_vocab_size(cfg, vocab_size)}
    if cfg.get("ffn") is not None:
        kwargs["ffn"] = instantiate(cfg.ffn)()
    return instantiate(cfg.decoder)(**kwargs)


def build_model(cfg: DictConfig, vocab_size: int | None, image_token_id: int):
    """Encoder, connector and decoder from ``cfg``, joined into a VLM."""
    from models.vlm import VLM

    encoder = build_encoder(cfg)
    decoder = build_decoder(cfg, vocab_size)
    connector = build_connector(cfg, encoder, decoder)
    return VLM(encoder, connector, decoder, image_token_id=image_token_id)
