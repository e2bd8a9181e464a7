"""ablate-params: how many parameters a configured model has, per component, without
allocating it.

Takes the same config and overrides as ``ablate-train``, validates them, builds the
model on the meta device (shapes only, no memory, no pretrained weights read) and
prints a table, then one JSON line::

    ablate-params experiment=mm1/full
    ablate-params experiment=molmo/full encoder.image_size=224 data.split.grid=[2,2]

Components and what each counts:

- ``encoder``: the image encoder as built. A tower cut at ``feature_layer`` does not
  build the blocks after it (``models/encoders/vit.py``), so a penultimate-layer
  encoder is one block smaller than the published tower.
- ``connector``: everything between encoder and decoder, including any cross-attention
  layers a connector runs inside decoder blocks (mPLUG-Owl3's hyper-attention lives in
  the connector, ``models/connectors/hyper_attention.py``); that share is also
  reported on its own as ``cross_attention`` with the component holding it (modules
  named ``*CrossAttention`` in the decoder or in a connector with ``attn_branches``;
  a connector's own pooling attention, as in Molmo, is not cross-attention).
- ``decoder``: the language model without its embeddings (``num_params(non_embedding=
  True)``), as in scaling-law papers.
- ``embeddings``: token embedding plus output head; a tied matrix counted once.
- ``total``: the sum of the four, equal to the model's parameter count.

Active parameters per token (``models.moe.active_params``): a module may define
``active_params() -> int`` (an MoE layer, ``models.moe.MoE``: router, shared experts
and ``top_k`` of its routed experts) and is then trusted for its whole subtree; every other parameter is active, so active
equals total for dense models. Embeddings count fully (the output head is a full
matmul for every token).

The last line printed is a JSON object with stable keys (see ``JSON_KEYS``)::

    {"name", "encoder", "connector", "decoder", "embeddings", "total"  # each {"total", "active"}
     "cross_attention": {"total", "active", "in"},  # "in": component name or null
     "image": {"size", "views", "tokens_per_view", "seq_tokens_per_view", "seq_tokens_per_image"},
     "vocab_size", "vocab_source", "tied_embeddings"}  # vocab_source: "config" or "tokenizer"

``tokens_per_view`` is what the connector outputs per view; ``seq_tokens_per_view`` is
what stays in the text sequence (the same, except for connectors that feed images
through cross-attention: one placeholder per view).

Hydra is told not to write anything: no output directory, no ``.hydra``, no log file.
"""

from __future__ import annotations

import json
import sys

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from ablate.config import CONF_DIR, register_configs
from ablate.tracking import register_resolvers
from ablate.validate import ConfigError, tokenizer_vocab_size, validate
from models.moe import active_params
from models.utils import count_params

register_configs()
register_resolvers()

COMPONENTS = ("encoder", "connector", "decoder", "embeddings")
JSON_KEYS = ("name", *COMPONENTS, "total", "cross_attention", "image", "vocab_size", "vocab_source",
             "tied_embeddings")

# Passed to Hydra before the user's overrides: this app only reads configs.
QUIET_OVERRIDES = ("hydra.run.dir=.", "hydra.output_subdir=null",
                   "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")


class ParamsError(ValueError):
    """A problem that stops the count, worded for the user."""


def resolve_vocab(cfg: DictConfig) -> tuple[int, str]:
    """``decoder.vocab_size`` if set, else the corpus tokenizer's size under ``paths.data``."""
    configured = cfg.decoder.get("vocab_size")
    if configured is not None:
        return int(configured), "config"
    found = tokenizer_vocab_size(cfg)
    if found is not None:
        return found, "tokenizer"
    raise ParamsError(
        f"decoder.vocab_size: not set, and no corpus tokenizer under paths.data={cfg.paths.data!r} "
        f"to take it from; set it (e.g. +decoder.vocab_size=32000) or point paths.data at a corpus")


def cross_attention(model: nn.Module) -> dict:
    """Parameters of cross-attention run inside decoder blocks, and the component that
    holds them: modules whose class name ends in ``CrossAttention`` in the decoder, or
    in a connector that feeds the decoder through ``attn_branches`` (mPLUG-Owl3). A
    connector's own pooling attention (Molmo, attention pooling) is not counted."""
    homes = ["decoder"]
    if callable(getattr(model.connector, "attn_branches", None)):
        homes.append("connector")
    found = {home: [m for m in getattr(model, home).modules()
                    if type(m).__name__.endswith("CrossAttention")] for home in homes}
    found = {home: mods for home, mods in found.items() if mods}
    if not found:
        return {"total": 0, "active": 0, "in": None}
    mods = [m for ms in found.values() for m in ms]
    total = sum(count_params(m) for m in mods)
    active = sum(active_params(m) for m in mods)
    return {"total": total, "active": active, "in": ",".join(found)}


def count(model: nn.Module) -> dict:
    """Total and active parameters per component of a ``models.vlm.VLM``."""
    dec = model.decoder
    dec_total = count_params(dec)
    dec_active = active_params(dec)
    emb = dec_total - dec.num_params(non_embedding=True)
    out = {
        slot: {"total": count_params(getattr(model, slot)),
               "active": active_params(getattr(model, slot))}
        for slot in ("encoder", "connector")
    }
    out.update({
        "decoder": {"total": dec_total - emb, "active": dec_active - emb},
        "embeddings": {"total": emb, "active": emb},
    })
    out["total"] = {k: sum(out[c][k] for c in COMPONENTS) for k in ("total", "active")}
    model_total = count_params(model)
    if out["total"]["total"] != model_total:  # a parameter outside the three slots
        raise ParamsError(f"components sum to {out['total']['total']:,} but the model has {model_total:,}")
    out["cross_attention"] = cross_attention(model)
    return out


def image_facts(cfg: DictConfig, model: nn.Module) -> dict:
    from ablate.data.splitting import Split

    views = Split.from_config(cfg.data.get("split")).num_views
    per_view = int(model.connector.num_tokens)
    seq_per_view = int(getattr(model.connector, "seq_tokens", per_view))
    return {"size": int(model.encoder.image_size), "views": views, "tokens_per_view": per_view,
            "seq_tokens_per_view": seq_per_view, "seq_tokens_per_image": views * seq_per_view}


def param_report(cfg: DictConfig) -> dict:
    """Validate ``cfg``, build its model on the meta device and count (see module doc)."""
    from ablate.build import build_model

    validate(cfg, check_paths=False)
    vocab, source = resolve_vocab(cfg)
    with torch.device("meta"):
        model = build_model(cfg, vocab, image_token_id=0)
    report = {"name": cfg.name, **count(model), "image": image_facts(cfg, model),
              "vocab_size": int(model.decoder.vocab_size), "vocab_source": source,
              "tied_embeddings": bool(getattr(model.decoder, "tie_embeddings", False))}
    return {k: report[k] for k in JSON_KEYS}


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_table(report: dict) -> str:
    tied = " (tied: counted once)" if report["tied_embeddings"] else ""
    cross = report["cross_attention"]
    rows = [("encoder", report["encoder"]), ("connector", report["connector"])]
    if cross["total"]:
        rows.append((f"  of which cross-attention (in the {cross['in']})", cross))
    rows += [("decoder (non-embedding)", report["decoder"]),
             (f"embeddings{tied}", report["embeddings"]), ("total", report["total"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'component':<{width}}  {'parameters':>22}  {'active per token':>22}"]
    for label, c in rows:
        lines.append(f"{label:<{width}}  {c['total']:>14,} {human(c['total']):>7}  "
                     f"{c['active']:>14,} {human(c['active']):>7}")
    im = report["image"]
    lines.append(f"image: {im['size']} px, {im['views']} view(s) per image, {im['tokens_per_view']} "
                 f"connector tokens per view, {im['seq_tokens_per_view']} sequence tokens per view "
                 f"-> {im['seq_tokens_per_image']} sequence tokens per image")
    lines.append(f"vocabulary: {report['vocab_size']:,} (from the {report['vocab_source']})")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    report = param_report(cfg)
    print(f"ablate-params: {cfg.name}")
    print(format_table(report))
    print(json.dumps(report, sort_keys=False), flush=True)
    return report


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, ParamsError) as e:
        print(f"ablate-params: {e}", file=sys.stderr)
        sys.exit(2)


def with_quiet_overrides(argv: list[str]) -> list[str]:
    """``argv`` with ``QUIET_OVERRIDES`` placed just before the user's first override
    (argparse wants the overrides together), skipping any the user set."""
    args = argv[1:]
    given = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a and not a.startswith("-")}
    quiet = [o for o in QUIET_OVERRIDES if o.split("=", 1)[0] not in given]
    first = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return [argv[0], *args[:first], *quiet, *args[first:]]


def main() -> None:
    sys.argv = with_quiet_overrides(sys.argv)
    _app()


if __name__ == "__main__":
    main()
