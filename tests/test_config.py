"""Every config composes and validates; bad overrides are rejected before training,
with an error that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from ablate.validate import ConfigError, validate
from tests.conftest import REPO, compose, run_cli, train_args

GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir())


def group_options():
    for group in GROUPS:
        for f in sorted((REPO / "conf" / group).glob("*.yaml")):
            yield group, f.stem


# The context each group's options are checked in: published-size encoders and
# connectors need a real patch grid and room in the sequence (built on the meta device:
# no memory, real shapes); sweep files are added with `+` and tested in test_sweeps.py.
CONTEXT = {
    "encoder": ["data.seq_len=1024", "decoder.max_seq_len=1024"],
    "connector": ["encoder=vit_l14_336", "data.seq_len=1024", "decoder.max_seq_len=1024"],
}


@pytest.mark.parametrize("group,option", [g for g in group_options() if g[0] != "sweep"])
def test_every_conf_file_composes_and_validates(group, option):
    cfg = compose(f"{group}={option}", *CONTEXT.get(group, []))
    facts = validate(cfg, check_paths=False)
    assert facts["tokens_per_image"] > 0
    assert facts["image_size"] == cfg.encoder.image_size


def test_groups_cover_the_model_slots():
    assert {"encoder", "connector", "decoder", "data", "optim", "deepspeed", "logger",
            "experiment"} <= set(GROUPS)


def test_demo_sweep_points_validate_and_differ():
    from ablate.demo import DEFAULT_SWEEP

    axes = dict(o.split("=") for o in DEFAULT_SWEEP)
    models = set()
    for connector in axes["connector"].split(","):
        for size in map(int, axes["encoder.image_size"].split(",")):
            facts = validate(compose("experiment=demo", f"connector={connector}",
                                     f"encoder.image_size={size}"), check_paths=False)
            expected = (size // 8) ** 2 if connector == "mlp" else 16
            assert facts["tokens_per_image"] == expected
            # Average pooling to as many tokens as there are patches would be the identity:
            # the two connectors would then train the same model, a wasted sweep point.
            assert connector == "mlp" or expected < (size // 8) ** 2
            models.add((connector, size))
    assert len(models) == 4


# Each bad configuration and the words its error must contain (the key, the reason).
BAD = [
    (["connector=avgpool", "connector.num_tokens=abc"], ["connector.num_tokens", "expected int"]),
    (["connector=avgpool", "connector.num_tokens=10"], ["connector.num_tokens=10", "square"]),
    (["connector=avgpool", "connector.num_tokens=256"], ["connector.num_tokens=256"]),
    (["encoder.image_size=30"], ["encoder.image_size=30", "patch_size"]),
    (["encoder.heads=3"], ["encoder.width", "heads"]),
    (["decoder.n_kv_heads=3"], ["decoder.n_heads", "n_kv_heads"]),
    (["+connector.foo=1"], ["connector.foo", "unknown key"]),
    (["+decoder.vocab_size=10"], ["decoder.vocab_size=10", "smaller than the tokenizer"]),
    (["+connector.in_dim=10"], ["connector.in_dim", "derived"]),
    (["encoder.width=1.5"], ["encoder.width", "expected int"]),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], ["train.global_batch_size=10"]),
    (["data.seq_len=20"], ["data.seq_len=20", "too short"]),
    (["data.seq_len=1024"], ["decoder.max_seq_len"]),
    (["optim.warmup_steps=500"], ["optim.warmup_steps=500"]),
    (["deepspeed.precision=fp8"], ["deepspeed.precision"]),
    (["deepspeed.zero_stage=4"], ["deepspeed.zero_stage=4"]),
    (["+data.weights.video=0.5"], ["data.weights", "video"]),
    (["data.weights.caption=-1"], ["data.weights"]),
    (["logger.backend=tensorboard"], ["logger.backend"]),
    (["paths.data=/nonexistent/corpus"], ["paths.data", "ablate-data"]),
    (["encoder.pretrained=/nonexistent/open_clip.bin"], ["encoder.pretrained=", "/nonexistent/open_clip.bin"]),
    (["encoder.pretrained_format=jax"], ["encoder.pretrained_format='jax'"]),
    # optim.lr takes a number or law[:file] (ablate/lr.py), so it is checked here.
    (["optim.lr=fast"], ["optim.lr='fast'", "expected a number"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_names_the_key(overrides, words, corpus):
    cfg = compose("experiment=smoke", f"paths.data={corpus}", *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_all_problems_are_listed_together(corpus):
    cfg = compose("experiment=smoke", f"paths.data={corpus}", "encoder.image_size=30",
                  "train.global_batch_size=10", "deepspeed.zero_stage=7")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert len(err.value.problems) == 3


@pytest.mark.parametrize("override,key", [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.no_such_key=1", "no_such_key"),
])
def test_schema_rejects_typos_and_types_at_composition(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose(override)
    assert key in str(err.value) or key in str(err.value.__cause__)


@pytest.mark.parametrize("overrides,key", [
    (["connector=avgpool", "connector.num_tokens=abc"], "connector.num_tokens"),
    (["encoder.image_size=30"], "encoder.image_size"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["connector.foo=1"], "connector.foo"),
])
def test_cli_exits_nonzero_before_training(overrides, key, corpus, tmp_path: Path):
    res = run_cli(train_args(corpus, tmp_path, *overrides), timeout=120)
    assert res.returncode != 0
    assert key in res.stderr + res.stdout
    # Nothing started: no parameter summary printed, no checkpoint or result written.
    assert "[ablate] params" not in res.stdout
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("results.json"))
