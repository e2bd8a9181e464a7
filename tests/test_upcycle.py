"""Upcycling (``ablate/upcycle.py``): the upcycled model computes its dense parent's
function at step 0 (full copies and fine-grained slices, k = 1 and 2, zero and random
routers, shared slices, MoE in some layers only), noise moves it by a controlled amount,
the function is pure and seeded, bad options and non-dense inputs are refused by name;
``ablate-upcycle`` reads a run's checkpoint and writes the MoE state dict and the
overrides that train it; ``train.init_from`` loads it strictly, and one ``ablate-train``
run of ``aria/tiny`` from an upcycled dense parent starts at the parent's loss on the
same batch and learns."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ablate.strategy import COMPLETE, DeepSpeedStrategy, token_loss
from ablate.tracking import read_metrics
from ablate.upcycle import UpcycleError, check_options, main, upcycle_state_dict, upcycled_ffn
from ablate.weights import load_init, read_state_dict, save_state_dict
from models.decoder.transformer import Transformer
from models.moe.moe import MoEFFN
from tests.conftest import compose, run_cli

V, D, F, LAYERS = 64, 32, 48, 3
DECODER = dict(vocab_size=V, dim=D, n_layers=LAYERS, n_heads=4, n_kv_heads=2, ffn_hidden=F)
RTOL = 1e-5  # of the largest logit; float32 lands near 5e-7


@torch.no_grad()
def dense_decoder(seed: int = 0) -> Transformer:
    """A dense decoder with random weights everywhere (norms too) and logits of order 1."""
    torch.manual_seed(seed)
    model = Transformer(**DECODER).eval()
    for name, p in model.named_parameters():
        p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.2)
    return model


def moe_decoder(state: dict, ffn: dict) -> Transformer:
    model = Transformer(**DECODER, ffn=MoEFFN(**{k: v for k, v in ffn.items() if not k.startswith("_")}))
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def logits(model: Transformer) -> torch.Tensor:
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    return model(model.embed(ids)).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def upcycled(dense: Transformer, **opts) -> Transformer:
    ffn_opts = {k: v for k, v in opts.items() if k not in ("noise", "router_init", "seed")}
    return moe_decoder(upcycle_state_dict(dense.state_dict(), **opts), upcycled_ffn(F, **ffn_opts))


CASES = {  # name: options; g = granularity, s = shared slices, E = g_r x replicas
    "copies k=1": dict(num_experts=4, top_k=1),
    "copies k=2": dict(num_experts=4, top_k=2),
    "copies k=2 zero router": dict(num_experts=4, top_k=2, router_init="zeros"),
    "copies k=1 zero router": dict(num_experts=4, top_k=1, router_init="zeros"),
    "split g=2 k=2": dict(num_experts=4, top_k=2, granularity=2),
    "split g=2 s=1 k=1 zero router": dict(num_experts=4, top_k=1, granularity=2, num_shared=1,
                                          router_init="zeros"),
    "split g=2 k=E zero router": dict(num_experts=4, top_k=4, granularity=2, router_init="zeros"),
    "split g=3 k=6 (two replicas)": dict(num_experts=9, top_k=6, granularity=3),
    "aria-like g=4 s=2 k=6": dict(num_experts=16, top_k=6, granularity=4, num_shared=2),
    "every 2nd layer": dict(num_experts=4, top_k=2, every=2, offset=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_upcycled_model_equals_dense_parent_at_step_0(name):
    dense = dense_decoder()
    err = rel_err(logits(upcycled(dense, **CASES[name])), logits(dense))
    assert err < RTOL, (name, err)


def test_noise_moves_outputs_by_a_controlled_amount():
    dense = dense_decoder()
    ref = logits(dense)
    errs = [rel_err(logits(upcycled(dense, num_experts=4, top_k=2, noise=n)), ref) for n in (1e-3, 1e-2)]
    # Linear in the noise, a few times its size (several noisy matrices in a row).
    assert 1e-4 < errs[0] < 1e-2 and 5 < errs[1] / errs[0] < 20, errs


def test_layout_slices_scaling_and_untouched_layers():
    dense = dense_decoder()
    sd = dense.state_dict()
    out = upcycle_state_dict(sd, num_experts=4, top_k=2, granularity=4, num_shared=2, every=2, offset=1,
                             router_init=0.1)
    h = F // 4
    assert "layers.1.ffn.w1.weight" not in out and "layers.0.ffn.w1.weight" in out  # layer 0, 2 dense
    assert out["layers.0.ffn.w1.weight"] is sd["layers.0.ffn.w1.weight"]  # shared, not copied
    assert out["layers.1.ffn.experts.w1"].shape == (4, h, D)
    assert out["layers.1.ffn.experts.w2"].shape == (4, D, h)
    w1, w2 = sd["layers.1.ffn.w1.weight"], sd["layers.1.ffn.w2.weight"]
    assert torch.equal(out["layers.1.ffn.shared.w1.weight"], w1[:2 * h])  # shared = first slices
    for e, t in enumerate([2, 3, 2, 3]):  # expert e = replica e // 2, routed slice t
        assert torch.equal(out["layers.1.ffn.experts.w1"][e], w1[t * h:(t + 1) * h])
        assert torch.allclose(out["layers.1.ffn.experts.w2"][e], 2 * w2[:, t * h:(t + 1) * h])  # x g_r
    router = out["layers.1.ffn.router.weight"]
    assert torch.equal(router[0], router[1]) and not torch.equal(router[1], router[2])  # one row per replica


def test_pure_and_seeded():
    sd = dense_decoder().state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    a = upcycle_state_dict(sd, num_experts=4, top_k=2, noise=0.1, seed=5)
    b = upcycle_state_dict(sd, num_experts=4, top_k=2, noise=0.1, seed=5)
    c = upcycle_state_dict(sd, num_experts=4, top_k=2, noise=0.1, seed=6)
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in sd)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.ffn.router.weight"], c["layers.0.ffn.router.weight"])
    assert not torch.equal(a["layers.0.ffn.experts.w1"][0], a["layers.0.ffn.experts.w1"][1])  # noisy copies


def test_whole_model_state_dict_with_prefix_and_ffn_node():
    sd = {f"decoder.{k}": v for k, v in dense_decoder().state_dict().items()}
    sd["encoder.blocks.0.mlp.0.weight"] = torch.zeros(2, 2)
    out = upcycle_state_dict(sd, num_experts=2, top_k=1)
    assert "decoder.layers.2.ffn.router.weight" in out and "encoder.blocks.0.mlp.0.weight" in out
    assert upcycled_ffn(F, num_experts=16, top_k=6, granularity=4, num_shared=2, lb_weight=1e-3) == {
        "_target_": "models.moe.MoEFFN", "_partial_": True, "num_experts": 16, "top_k": 6,
        "expert_hidden": 12, "num_shared": 2, "shared_hidden": None, "every": 1, "offset": 0,
        "renormalize": True, "lb_weight": 1e-3, "z_weight": 0.001, "backend": "torch"}


@pytest.mark.parametrize("opts, words", [
    (dict(num_experts=4, top_k=5), "top_k=5"),
    (dict(num_experts=0, top_k=1), "num_experts=0"),
    (dict(num_experts=5, top_k=2, granularity=2), "num_experts=5 must be a multiple"),
    (dict(num_experts=4, top_k=1, granularity=2), "top_k=1 must be a multiple"),
    (dict(num_experts=4, top_k=2, granularity=2, num_shared=2), "num_shared=2"),
    (dict(num_experts=4, top_k=2, granularity=2, router_init="zeros"), "router_init=zeros"),
    (dict(num_experts=4, top_k=2, noise=-1.0), "noise=-1.0"),
    (dict(num_experts=4, top_k=2, router_init="abc"), "router_init='abc'"),
    (dict(num_experts=4, top_k=2, offset=-1), "offset=-1"),
])
def test_bad_options_are_named(opts, words):
    with pytest.raises(UpcycleError, match=words):
        check_options(**opts)


def test_inputs_that_cannot_be_upcycled():
    dense = dense_decoder().state_dict()
    moe = upcycle_state_dict(dense, num_experts=2, top_k=1)
    with pytest.raises(UpcycleError, match="mixture-of-experts one already"):
        upcycle_state_dict(moe, num_experts=2, top_k=1)
    with pytest.raises(UpcycleError, match="no dense decoder FFN"):
        upcycle_state_dict({"encoder.w": torch.zeros(1)}, num_experts=2, top_k=1)
    with pytest.raises(UpcycleError, match="past the last"):
        upcycle_state_dict(dense, num_experts=2, top_k=1, offset=LAYERS)
    with pytest.raises(UpcycleError, match="must divide the dense FFN width 48"):
        upcycle_state_dict(dense, num_experts=5, top_k=5, granularity=5)
    two = {**dense, **{f"x.{k}": v for k, v in dense.items()}}
    with pytest.raises(UpcycleError, match="several decoders"):
        upcycle_state_dict(two, num_experts=2, top_k=1)


def test_load_init_is_strict_per_component(tmp_path):
    class VLMish(torch.nn.Module):
        def __init__(self, ffn=None):
            super().__init__()
            self.encoder = torch.nn.Linear(2, 2)
            self.decoder = Transformer(**DECODER, ffn=ffn)

    ffn = upcycled_ffn(F, num_experts=2, top_k=1)
    moe = {f"decoder.{k}": v for k, v in upcycle_state_dict(dense_decoder().state_dict(), num_experts=2,
                                                           top_k=1).items()}
    save_state_dict(moe, tmp_path / "model.safetensors")
    model = VLMish(MoEFFN(**{k: v for k, v in ffn.items() if not k.startswith("_")}))
    enc = model.encoder.weight.clone()
    assert load_init(model, tmp_path) == ["decoder"]  # the encoder keeps its init
    assert torch.equal(model.encoder.weight, enc)
    assert torch.equal(model.decoder.layers[0].ffn.experts.w1, moe["decoder.layers.0.ffn.experts.w1"])
    with pytest.raises(ValueError, match="not in the model: decoder.layers.0.ffn.experts"):
        load_init(VLMish(), tmp_path)  # a dense model cannot take MoE weights
    save_state_dict({k: v for k, v in moe.items() if "layers.2" not in k}, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="missing: decoder.layers.2"):
        load_init(model, tmp_path / "partial.safetensors")


# ---------------------------------------------------------------- ablate-upcycle


def fake_run(run_dir, cfg, state, overrides, step=4):
    """A run directory as ablate-train leaves it (ZeRO 0-2): resolved config.yaml,
    .hydra/overrides.yaml, and a complete DeepSpeed checkpoint holding ``module``."""
    tag = run_dir / "checkpoints" / DeepSpeedStrategy.tag(step)
    tag.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    torch.save({"module": state}, tag / "mp_rank_00_model_states.pt")
    (tag / COMPLETE).write_text("{}")
    return run_dir


def dense_aria_tiny(corpus):
    """aria/tiny with a dense FFN (width decoder.ffn_hidden = 4 slices of 32) in place of
    its MoE: the dense parent that upcycling turns into aria/tiny."""
    from ablate.build import build_model
    from ablate.data.tokenizer import load_tokenizer

    cfg = compose("experiment=aria/tiny", f"paths.data={corpus}")
    cfg.ffn = OmegaConf.create({"_target_": "models.moe.DenseFFN", "_partial_": True})
    tok = load_tokenizer(corpus)
    torch.manual_seed(3)
    return cfg, build_model(cfg, tok.vocab_size, tok.image_id).eval(), tok


def aria_overrides(corpus) -> list[str]:
    """What such a run's .hydra/overrides.yaml would hold, besides its ffn choice."""
    return ["experiment=aria/tiny", f"paths.data={corpus}"]


ARIA_UPCYCLE = ["--granularity", "4", "--shared", "2", "--experts", "16", "--top-k", "6",
                "--lb-weight", "1e-3", "--z-weight", "1e-5"]


def test_cli_from_run_dir_and_checkpoint_dir(corpus, tmp_path, capsys):
    cfg, model, _ = dense_aria_tiny(corpus)
    # The source's own ffn choice and init_from are dropped from the overrides it passes on.
    run = fake_run(tmp_path / "run", cfg, model.state_dict(),
                   [*aria_overrides(corpus), "ffn=dense", "train.init_from=/elsewhere"])
    out = tmp_path / "up"
    assert main([str(run), "--out", str(out), *ARIA_UPCYCLE]) == 0
    state = read_state_dict(out)
    assert "decoder.layers.1.ffn.shared.w1.weight" in state and "encoder.patch_embed.weight" in state
    spec = OmegaConf.load(out / "upcycled.yaml")
    assert spec.step == 4 and spec.scope == "model"
    # The upcycled ffn node is aria/tiny's own: the preset is this dense decoder, upcycled.
    preset = OmegaConf.to_container(compose("experiment=aria/tiny").ffn)
    assert OmegaConf.to_container(spec.ffn) == preset
    assert list(spec.overrides[:3]) == [*aria_overrides(corpus), "ffn=moe"]
    assert spec.overrides[-1] == f"train.init_from={out}"
    err = capsys.readouterr().err
    assert "upcycling" in err  # the progress bar
    # A checkpoint directory works too; an existing OUT needs --force.
    ckpt = run / "checkpoints" / DeepSpeedStrategy.tag(4)
    assert main([str(ckpt), "--out", str(out), *ARIA_UPCYCLE]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([str(ckpt), "--out", str(out), *ARIA_UPCYCLE, "--noise", "0.1", "--force"]) == 0
    assert not torch.equal(read_state_dict(out)["decoder.layers.0.ffn.experts.w1"],
                           state["decoder.layers.0.ffn.experts.w1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "up"]  # no temporary left behind


def test_cli_refuses_moe_runs_bad_sources_and_options(corpus, tmp_path, capsys):
    cfg, model, _ = dense_aria_tiny(corpus)
    moe_cfg = compose("experiment=aria/tiny", f"paths.data={corpus}")
    moe_run = fake_run(tmp_path / "moe", moe_cfg, model.state_dict(), [])
    dense_run = fake_run(tmp_path / "dense", cfg, model.state_dict(), [])
    cases = [([str(moe_run)], "trained an MoE decoder"),
             ([str(tmp_path)], "neither a run directory"),
             ([str(dense_run), "--step", "9"], "no complete checkpoint for step 9"),
             ([str(dense_run), "--granularity", "2", "--top-k", "1"], "top_k=1 must be a multiple"),
             ([str(dense_run), "--granularity", "5", "--experts", "5", "--top-k", "5"],
              "must divide the dense FFN width 128")]
    for args, words in cases:
        assert main([*args, "--out", str(tmp_path / "out")]) == 2, args
        assert words in capsys.readouterr().err, args
    assert not (tmp_path / "out").exists()


def test_aria_tiny_trains_from_upcycled_dense_parent_starting_at_its_loss(corpus, tmp_path):
    """The one end-to-end run: ablate-train experiment=aria/tiny train.init_from=<upcycled>.
    Its first logged LM loss is the dense parent's loss on the same two micro-batches."""
    from ablate.data.pipeline import build_train_loader
    from ablate.data.splitting import Split
    from ablate.validate import validate

    cfg, dense, tok = dense_aria_tiny(corpus)
    run = fake_run(tmp_path / "dense", cfg, dense.state_dict(), aria_overrides(corpus))
    out = tmp_path / "up"
    assert main([str(run), "--out", str(out), *ARIA_UPCYCLE]) == 0
    overrides = list(OmegaConf.load(out / "upcycled.yaml").overrides)
    steps = 6
    res = run_cli(["-m", "ablate.train", *overrides, f"paths.runs={tmp_path / 'runs'}",
                   f"train.max_steps={steps}", "train.ckpt_every=0", "eval.at_end=false", "logger=none"],
                  timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert f"connector, decoder, encoder initialised from {out}" in res.stdout
    (metrics,) = (tmp_path / "runs").rglob("metrics.jsonl")
    records = [r for r in read_metrics(metrics.parent) if "train/lm_loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))

    # The dense parent on the run's first optimizer step: the same loader, same batches.
    moe_cfg = compose(*overrides)
    derived = validate(moe_cfg, check_paths=False)
    t, d = moe_cfg.train, moe_cfg.data
    loader = build_train_loader(corpus, tok, weights=dict(d.weights), seq_len=d.seq_len,
                                micro_batch_size=t.micro_batch_size,
                                tokens_per_image=derived["tokens_per_image"],
                                image_size=derived["image_size"], split=Split.from_config(d.split),
                                seed=moe_cfg.seed, num_workers=0, shuffle_buffer=d.shuffle_buffer)
    accum = t.global_batch_size // t.micro_batch_size
    with torch.no_grad():
        parent = sum(token_loss(dense(b["input_ids"], b["images"], positions_BT=b["positions"],
                                      doc_ids_BT=b["doc_ids"]).logits, b["labels"])[0].item()
                     for b in (next(loader) for _ in range(accum))) / accum
    first = records[0]["train/lm_loss"]
    assert abs(first - parent) < 1e-4, (first, parent)
    assert math.log(tok.vocab_size) - 1 < first < math.log(tok.vocab_size) + 1
    last = sum(r["train/lm_loss"] for r in records[-2:]) / 2
    assert last < first - 0.3, (first, last)
    # aria/tiny's router statistics: 16 experts per layer, 6 routed per token.
    load = records[0]["moe/layer0/expert_load"]
    assert len(load) == 16 and sum(load) == pytest.approx(1.0)
