"""The multimodal model: image encoder -> connector -> decoder.

Text and images share one token sequence: the data pipeline expands each ``<image>``
placeholder to ``tokens_per_image`` copies of ``image_token_id``, and ``forward``
overwrites those embedding slots, in order, with the connector's image tokens (image 0
fills the first T placeholders, image 1 the next T, ...). Splicing at the embedding
level keeps the decoder unaware of images, so any decoder (dense or MoE) plugs in.

A connector may instead feed images through the decoder's ``attn_branches`` (it has
an ``attn_branches`` method; mPLUG-Owl3's hyper-attention): then each image keeps
``seq_tokens`` placeholders in the sequence (their text embedding stays), nothing is
spliced, and the connector's per-block callables see the image tokens.

Incremental decoding passes a ``KVCache`` (``models.decoder.transformer``): the
prefill call is an ordinary forward (images spliced, or a branched connector's image
keys kept in the cache's ``extra``); later calls (``cache.length > 0``) take text
tokens only, since their images were consumed by the prefill.

Shape legend: B batch, T sequence, D model dim, N images, C/H/W image channels and
size, P patches per image, I image tokens per image, E encoder width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.decoder.transformer import DecoderOutput, KVCache


class VLM(nn.Module):
    """Vision-language model over an interleaved token sequence.

    Args:
        encoder: image encoder (pixels ``N,C,H,W`` -> ``N,P,E``); exposes ``image_size``.
        connector: patch features ``N,P,E`` -> image tokens ``N,I,D``; exposes ``num_tokens``.
        decoder: language decoder with ``dim``, ``vocab_size``, ``embed(ids)`` and
            ``forward(x, positions, doc_ids) -> DecoderOutput``.
        image_token_id: token id of the image placeholder in ``input_ids``.
    """

    def __init__(self, encoder: nn.Module, connector: nn.Module, decoder: nn.Module, image_token_id: int):
        super().__init__()
        vocab_size = getattr(decoder, "vocab_size", None)
        if image_token_id < 0 or (vocab_size is not None and image_token_id >= vocab_size):
            raise ValueError(f"image_token_id={image_token_id} is outside the vocabulary [0, {vocab_size})")
        out_dim = getattr(connector, "out_dim", decoder.dim)
        if out_dim != decoder.dim:
            raise ValueError(f"connector out_dim={out_dim} does not match decoder dim={decoder.dim}")
        self.encoder = encoder
        self.connector = connector
        self.decoder = decoder
        self.image_token_id = image_token_id
        # Placeholders per image in the sequence; image tokens (connector.num_tokens)
        # are spliced into them unless the connector works through attention branches.
        self.tokens_per_image = getattr(connector, "seq_tokens", connector.num_tokens)
        self.branched = callable(getattr(connector, "attn_branches", None))
        self.image_size = encoder.image_size

    def encode_images(self, images_NCHW: Tensor) -> Tensor:
        """Image tokens ``N,I,D`` ready to be spliced into the decoder's input."""
        return self.connector(self.encoder(images_NCHW))

    def forward(
        self,
        input_ids_BT: Tensor,
        images_NCHW: Tensor | None = None,
        positions_BT: Tensor | None = None,
        doc_ids_BT: Tensor | None = None,
        image_tokens_NID: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> DecoderOutput:
        """Logits for ``input_ids_BT`` with the images' tokens in its placeholder slots.

        Pass either ``images_NCHW`` or, to reuse an earlier ``encode_images`` result
        (e.g. at every step of greedy decoding), ``image_tokens_NID``. With a ``cache``
        (see the module docstring) the tokens continue the cached ones; positions and
        document ids then follow ``Transformer.forward``'s cache conventions.
        """
        if images_NCHW is not None and image_tokens_NID is not None:
            raise ValueError("pass images_NCHW or image_tokens_NID, not both")
        if cache is not None and cache.length > 0:
            return self._decode_step(input_ids_BT, positions_BT, doc_ids_BT,
                                     images_NCHW is not None or image_tokens_NID is not None, cache)
        x_BTD = self.decoder.embed(input_ids_BT)
        is_image_BT = input_ids_BT == self.image_token_id
        source = images_NCHW if image_tokens_NID is None else image_tokens_NID
        n_images = 0 if source is None else source.shape[0]
        n_slots = int(is_image_BT.sum())  # one host sync; a mismatch would silently misalign
        if n_slots != n_images * self.tokens_per_image:
            raise ValueError(
                f"input_ids hold {n_slots} image placeholders but {n_images} images x "
                f"{self.tokens_per_image} tokens per image = {n_images * self.tokens_per_image} are needed"
            )
        # An empty image batch (N=0) still runs the encoder and connector: every
        # micro-batch then touches every parameter, which sharded or data-parallel
        # wrappers applied from outside need (no unused parameters, no rank running a
        # module its peers skip).
        branches = None
        if source is not None:
            img_NID = self.encode_images(images_NCHW) if image_tokens_NID is None else image_tokens_NID
            if self.branched:
                B, T = input_ids_BT.shape
                pos_BT = torch.arange(T, device=x_BTD.device) if positions_BT is None else positions_BT
                state = None
                if cache is not None:
                    state = cache.extra["images"] = {}
                branches = self.connector.attn_branches(img_NID.to(x_BTD.dtype), is_image_BT,
                                                        pos_BT.expand(B, T), doc_ids_BT, state=state)
            else:
                # masked_scatter fills the True slots in row-major order: image order is kept.
                x_BTD = x_BTD.masked_scatter(is_image_BT[..., None], img_NID.to(x_BTD.dtype))
        extra = {} if cache is None else {"cache": cache}
        if branches is None:  # the plain call, so any decoder works
            return self.decoder(x_BTD, positions_BT=positions_BT, doc_ids_BT=doc_ids_BT, **extra)
        return self.decoder(x_BTD, positions_BT=positions_BT, doc_ids_BT=doc_ids_BT, attn_branches=branches,
                            **extra)

    def _decode_step(self, input_ids_BT: Tensor, positions_BT: Tensor | None, doc_ids_BT: Tensor | None,
                     has_images: bool, cache: KVCache) -> DecoderOutput:
        """Text tokens after a prefilled cache: no splicing; a branched connector's
        queries attend to the image keys the prefill left in ``cache.extra``."""
        if has_images or bool((input_ids_BT == self.image_token_id).any()):
            raise ValueError("images enter in the prefill call only: a call after it (cache.length="
                             f"{cache.length}) takes neither images nor image placeholders")
        x_BTD = self.decoder.embed(input_ids_BT)
        state = cache.extra.get("images")
        if not self.branched or state is None:
            return self.decoder(x_BTD, positions_BT=positions_BT, doc_ids_BT=doc_ids_BT, cache=cache)
        B, T = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(cache.length, cache.length + T, device=x_BTD.device)
        branches = self.connector.step_branches(state, positions_BT.expand(B, T), doc_ids_BT)
        return self.decoder(x_BTD, positions_BT=positions_BT, doc_ids_BT=doc_ids_BT, attn_branches=branches,
                            cache=cache)
