"""Every config composes and validates (the bad ones are in test_bad_configs.py)."""

from __future__ import annotations

import pytest

from ablate.validate import validate
from tests.conftest import REPO, compose

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


# Bad configurations, each rejected by name before anything starts: tests/test_bad_configs.py.
