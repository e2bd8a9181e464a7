"""The corpus of bad configurations: each is rejected by ``ablate.validate`` (or by the
typed schema at composition) before any process group, data loader or job starts, with
a message that names the key and the reason; ``ablate-train`` exits with status 2 and
starts nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from ablate.validate import ConfigError, validate
from tests.conftest import compose, run_cli, train_args

# (overrides, ranks, words one problem must contain: the key with its value, a reason).
# "{weights}" is a directory of weight files (fixture `weights`), "{no_vqa}" a corpus
# without eval/vqa shards (fixture `no_vqa`); everything else runs on the test corpus.
BAD: list[tuple[list[str], int, list[str]]] = [
    # model slots: unknown keys, wrong types, derived arguments (signature of _target_)
    (["+connector.foo=1"], 1, ["connector.foo", "unknown key"]),
    (["+connector.in_dim=10"], 1, ["connector.in_dim", "derived"]),
    (["encoder.width=1.5"], 1, ["encoder.width", "expected int"]),
    (["connector=avgpool", "connector.num_tokens=abc"], 1, ["connector.num_tokens", "expected int"]),
    # impossible shapes, found by building the model on the meta device
    (["encoder.image_size=30"], 1, ["encoder.image_size=30", "patch_size"]),
    (["encoder.patch_size=7"], 1, ["encoder.image_size=32", "patch_size=7"]),
    (["encoder.heads=3"], 1, ["encoder.width", "heads"]),
    (["decoder.n_kv_heads=3"], 1, ["decoder.n_heads", "n_kv_heads"]),
    (["decoder.dim=30"], 1, ["decoder.dim=30", "n_heads"]),
    (["connector=avgpool", "connector.num_tokens=10"], 1, ["connector.num_tokens=10", "square"]),
    (["connector=avgpool", "connector.num_tokens=64"], 1, ["connector.num_tokens=64", "num_patches=16"]),
    (["+decoder.vocab_size=10"], 1, ["decoder.vocab_size=10", "smaller than the tokenizer"]),
    # mixture of experts and expert parallelism
    (["ffn=moe", "ffn.top_k=9"], 1, ["ffn.top_k=9", "num_experts=8"]),
    (["ffn=moe", "ffn.num_shared=-1"], 1, ["ffn.num_shared=-1", ">= 0"]),
    (["ffn=moe", "ffn.every=0"], 1, ["ffn.every=0", "positive"]),
    (["ffn=moe", "ffn.offset=5"], 1, ["ffn.offset=5", "no MoE layer in a 2-layer decoder"]),
    (["ffn=moe", "deepspeed.expert_parallel=3", "train.global_batch_size=12"], 3,
     ["ffn.num_experts=8", "not divisible by deepspeed.expert_parallel=3"]),
    # batch arithmetic: micro-batch x accumulation x ranks = global batch
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 1,
     ["train.global_batch_size=10", "not divisible", "4 x 1 = 4"]),
    (["train.global_batch_size=8", "train.micro_batch_size=8"], 2,
     ["train.global_batch_size=8", "smaller than", "8 x 2 = 16"]),
    (["train.global_batch_size=0"], 1, ["train.global_batch_size=0", "smaller than"]),
    (["train.micro_batch_size=0"], 1, ["train.micro_batch_size=0", ">= 1"]),
    (["train.max_steps=0"], 1, ["train.max_steps=0", ">= 1"]),
    # sequence and image splitting
    (["data.seq_len=20"], 1, ["data.seq_len=20", "too short"]),
    (["data.seq_len=1024"], 1, ["decoder.max_seq_len=256", "smaller than data.seq_len=1024"]),
    (["data.split.grid=[3,3]"], 1, ["data.seq_len=96", "too short for one image (144 tokens)"]),
    (["data.split.grid=[0,2]"], 1, ["data.split.grid=[0, 2]", "integers >= 1"]),
    (["data.split.grid=[2,2]", "data.split.overlap=40"], 1, ["data.split.overlap=40", "smaller than"]),
    # data: paths, mixture, shards against ranks x workers
    (["paths.data=/nonexistent/corpus"], 1, ["paths.data='/nonexistent/corpus'", "ablate-data"]),
    (["+data.weights.video=0.5"], 1, ["data.weights", "unknown streams ['video']"]),
    (["data.weights.caption=-1"], 1, ["data.weights=", "must be finite, >= 0"]),
    (["data.weights.text=inf"], 1, ["data.weights=", "must be finite"]),
    (["data.weights.caption=0", "data.weights.interleaved=0", "data.weights.text=0"], 1,
     ["data.weights=", "positive sum"]),
    (["data.num_workers=-1"], 1, ["data.num_workers=-1", ">= 0"]),
    (["data.num_workers=3"], 1,
     ["data.num_workers=3", "stream 'interleaved'", "2 train shard(s)", "3 readers", "--shard-size"]),
    (["data.num_workers=2"], 2,
     ["data.num_workers=2", "stream 'text'", "4 readers (ranks x workers = 2 x 2)", "data.num_workers=1"]),
    (["train.global_batch_size=16"], 4, ["data.num_workers=0", "stream 'interleaved'", "4 readers"]),
    (["data.shuffle_buffer=-1"], 1, ["data.shuffle_buffer=-1", ">= 0"]),
    (["paths.data={no_vqa}"], 1, ["eval.max_vqa=8", "no eval/vqa shards"]),
    # optimizer
    (["optim.lr=fast"], 1, ["optim.lr='fast'", "expected a number"]),
    (["optim.warmup_steps=500"], 1, ["optim.warmup_steps=500", "train.max_steps"]),
    (["optim.min_lr_ratio=1.5"], 1, ["optim.min_lr_ratio=1.5", "[0, 1]"]),
    (["optim.weight_decay=-0.1"], 1, ["optim.weight_decay=-0.1", ">= 0"]),
    (["optim.betas=[0.9,1.5]"], 1, ["optim.betas=[0.9, 1.5]", "[0, 1)"]),
    (["optim.eps=0"], 1, ["optim.eps=0", "> 0"]),
    (["optim.grad_clip=-1"], 1, ["optim.grad_clip=-1", ">= 0"]),
    # DeepSpeed, logging, checkpoints, evaluation, seeds, signals
    (["deepspeed.precision=fp8"], 1, ["deepspeed.precision='fp8'", "fp32 or bf16"]),
    (["deepspeed.zero_stage=4"], 1, ["deepspeed.zero_stage=4", "0, 1, 2 or 3"]),
    (["logger.backend=tensorboard"], 1, ["logger.backend='tensorboard'", "wandb or none"]),
    (["logger.mode=live"], 1, ["logger.mode='live'", "offline, online or disabled"]),
    (["train.log_every=0"], 1, ["train.log_every=0", ">= 1"]),
    (["train.ckpt_every=-1"], 1, ["train.ckpt_every=-1", ">= 0"]),
    (["train.keep_checkpoints=-1"], 1, ["train.keep_checkpoints=-1", ">= 0"]),
    (["train.preempt_signal=KILL"], 1, ["train.preempt_signal='KILL'", "catch"]),
    (["train.preempt_signal=USR9"], 1, ["train.preempt_signal='USR9'", "catch"]),
    (["eval.max_vqa=-1"], 1, ["eval.max_vqa=-1", ">= 0"]),
    (["eval.batch_size=0"], 1, ["eval.batch_size=0", ">= 1"]),
    (["eval.max_new_tokens=0"], 1, ["eval.max_new_tokens=0", ">= 1"]),
    (["eval.shots=[0,0]"], 1, ["eval.shots=[0, 0]", "listed twice"]),
    (["seed=-1"], 1, ["seed=-1", "[0, 2**32)"]),
    (["train.max_requeues=-1"], 1, ["train.max_requeues=-1", ">= 0"]),
    # keys added with `+` pass Hydra's struct check; the schema walk names them
    (["+train.max_step=5"], 1, ["train.max_step", "unknown key", "did you mean train.max_steps"]),
    (["+optim.momentum=0.9"], 1, ["optim.momentum", "unknown key"]),
    (["+data.split.overlaps=2"], 1, ["data.split.overlaps", "unknown key"]),
    (["+epochs=3"], 1, ["epochs", "unknown key"]),
    # weights: the encoder's pretrained file, train.init_from (missing checkpoint for upcycling)
    (["encoder.pretrained=/nonexistent/open_clip.bin"], 1, ["encoder.pretrained=", "/nonexistent/open_clip.bin"]),
    (["encoder.pretrained_format=jax"], 1, ["encoder.pretrained_format='jax'"]),
    (["train.init_from=/nonexistent/upcycled"], 1,
     ["train.init_from='/nonexistent/upcycled'", "no such file", "ablate-upcycle"]),
    (["train.init_from={weights}/empty"], 1, ["train.init_from=", "no model.safetensors"]),
    (["train.init_from={weights}/garbage.safetensors"], 1, ["train.init_from=", "not a readable safetensors"]),
    (["train.init_from={weights}/garbage.pt"], 1, ["train.init_from=", "not a readable torch"]),
    (["train.init_from={weights}/moe"], 1,
     ["train.init_from=", "do not fit", "not in the model: decoder.layers.0.ffn."]),
    (["train.init_from={weights}/wrong_shape.safetensors"], 1,
     ["train.init_from=", "do not fit", "shape (file vs model): decoder.norm.weight [65] vs [64]"]),
    (["train.init_from={weights}/partial.pt"], 1, ["train.init_from=", "missing: decoder.norm.weight"]),
]


@pytest.fixture(scope="module")
def weights(corpus, tmp_path_factory) -> Path:
    """Weight files for ``train.init_from``: a model of the smoke config in the layouts
    ``ablate.weights`` reads, and broken or mismatched ones."""
    from ablate.build import build_model
    from ablate.data.tokenizer import load_tokenizer
    from ablate.weights import STATE_FILE, save_state_dict

    out = tmp_path_factory.mktemp("weights")
    tok = load_tokenizer(corpus)

    def state(*overrides: str) -> dict:
        cfg = compose("experiment=smoke", f"paths.data={corpus}", *overrides)
        return build_model(cfg, tok.vocab_size, tok.image_id).state_dict()

    good = state()
    (out / "good").mkdir()
    save_state_dict(good, out / "good" / STATE_FILE)
    torch.save(good, out / "good.pt")
    (out / "moe").mkdir()
    save_state_dict(state("ffn=moe", "ffn.num_experts=2"), out / "moe" / STATE_FILE)
    save_state_dict({**good, "decoder.norm.weight": torch.ones(65)}, out / "wrong_shape.safetensors")
    torch.save({k: v for k, v in good.items() if k != "decoder.norm.weight"}, out / "partial.pt")
    (out / "empty").mkdir()
    (out / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    (out / "garbage.pt").write_bytes(b"not a pickle")
    return out


@pytest.fixture(scope="module")
def no_vqa(corpus, tmp_path_factory) -> Path:
    """The test corpus without its eval/vqa shards (links to everything else)."""
    out = tmp_path_factory.mktemp("no_vqa")
    for p in corpus.iterdir():
        if p.name != "eval":
            os.symlink(p, out / p.name)
    (out / "eval").mkdir()
    for p in (corpus / "eval").iterdir():
        if p.name != "vqa":
            os.symlink(p, out / "eval" / p.name)
    return out


def rejected(overrides: list[str], ranks: int, corpus: Path) -> ConfigError:
    cfg = compose("experiment=smoke", f"paths.data={corpus}", *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=ranks)
    return err.value


@pytest.mark.parametrize("overrides,ranks,words", BAD,
                         ids=[f"{' '.join(o)} @{r}" for o, r, _ in BAD])
def test_bad_config_is_rejected_naming_key_and_reason(overrides, ranks, words, corpus, weights, no_vqa):
    filled = [o.format(weights=weights, no_vqa=no_vqa) for o in overrides]
    problems = rejected(filled, ranks, corpus).problems
    assert any(all(w in p for w in words) for p in problems), (words, problems)


def test_the_corpus_is_large_and_has_no_repeats():
    assert len(BAD) >= 35
    keys = [(tuple(o), r) for o, r, _ in BAD]
    assert len(keys) == len(set(keys))


def test_the_base_config_is_valid(corpus, weights):
    """The corpus's failures come from its overrides: the smoke config itself passes at
    1 and 2 ranks, and weights that fit load by either layout."""
    for ranks in (1, 2):
        validate(compose("experiment=smoke", f"paths.data={corpus}"), world_size=ranks)
    for good in ("good", "good.pt"):
        validate(compose("experiment=smoke", f"paths.data={corpus}", f"train.init_from={weights / good}"))


def test_all_problems_are_listed_together(corpus):
    keys = ["encoder.image_size=30", "train.global_batch_size=10", "deepspeed.zero_stage=7",
            "train.init_from='/nonexistent/w'", "eval.batch_size=0", "data.num_workers=3", "optim.lr='fast'"]
    overrides = [k.replace("'", "") for k in keys]
    problems = rejected(overrides, 1, corpus).problems
    for key in keys:
        assert sum(p.startswith(key) for p in problems) >= 1, (key, problems)
    # one line per problem; data.num_workers=3 starves two streams (2 shards each)
    assert len(problems) == len(keys) + 1, problems


# Rejected by the typed schema while Hydra composes (ablate/config.py): wrong types and
# unknown keys given without `+`.
SCHEMA_BAD = [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.no_such_key=1", "no_such_key"),
    ("data.seq_len=long", "data.seq_len"),
    ("deepspeed.zero_stage=one", "deepspeed.zero_stage"),
    ("eval.at_end=maybe", "eval.at_end"),
    ("data.split.grid=[a,b]", "data.split.grid"),
]


@pytest.mark.parametrize("override,key", SCHEMA_BAD)
def test_schema_rejects_typos_and_types_at_composition(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose(override)
    assert key in str(err.value) or key in str(err.value.__cause__)


# A handful through the real CLI: (overrides, key, exit status). Hydra's own
# composition errors exit 1; everything ablate.validate rejects exits 2.
CLI = [
    (["connector=avgpool", "connector.num_tokens=abc"], "connector.num_tokens", 2),
    (["encoder.image_size=30"], "encoder.image_size", 2),
    (["ffn=moe", "ffn.top_k=9"], "ffn.top_k=9", 2),
    (["data.num_workers=3"], "data.num_workers=3", 2),
    (["train.init_from=/nonexistent/upcycled"], "train.init_from", 2),
    (["+train.max_step=5"], "train.max_step", 2),
    (["train.max_steps=abc"], "train.max_steps", 1),
    (["connector.foo=1"], "connector.foo", 1),
]


@pytest.mark.parametrize("overrides,key,status", CLI, ids=[" ".join(o) for o, _, _ in CLI])
def test_cli_exits_before_anything_starts(overrides, key, status, corpus, tmp_path: Path):
    res = run_cli(train_args(corpus, tmp_path, *overrides), timeout=120)
    assert res.returncode == status, res.stderr[-2000:]
    assert key in res.stderr
    # Nothing started: no parameter summary printed, no checkpoint or result written.
    assert "[ablate] params" not in res.stdout
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("results.json"))
