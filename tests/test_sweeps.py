"""The sweep files of conf/sweep/: every point of every grid composes, validates, and
really changes what its axis names; and `--multirun +sweep=...` launches one job per
point through the real CLI.

Points are composed on top of ``experiment=mm1/full``, the setting the grids name
(published sizes, sequence length 4096: one-token-per-patch connectors at 336 px need
more than the default 256 tokens); all builds are on the meta device."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ablate.validate import validate
from tests.conftest import REPO, compose, run_cli, train_args

SWEEPS = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))
GROUPS = {"encoder", "connector", "decoder", "data"}
BASE = "experiment=mm1/full"
# Keys the base experiment sets inside the groups (they stay after a group is swapped).
BASE_KEYS = yaml.safe_load((REPO / "conf" / "experiment" / "mm1" / "full.yaml").read_text())
# Points per grid: the axes the sweeps are meant to cover.
EXPECTED_POINTS = {"encoder": 4, "resolution": 3, "image_tokens": 3, "connector": 8, "data_mix": 6,
                   "lr_law": 24}


def sweep_params(name: str) -> dict[str, str]:
    conf = yaml.safe_load((REPO / "conf" / "sweep" / f"{name}.yaml").read_text())
    return conf["hydra"]["sweeper"]["params"]


def grid(name: str) -> list[list[str]]:
    """The cartesian product of the sweep's values, parsed the way Hydra's basic sweeper
    does (so a dict value's inner commas do not split it)."""
    overrides = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in sweep_params(name).items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [f"{o.get_key_element()}={o.get_value_element_as_str()}"] for o in overrides]
    return [list(point) for point in itertools.product(*axes)]


def group_option(group: str, option: str) -> dict:
    return yaml.safe_load((REPO / "conf" / group / f"{option}.yaml").read_text())


def test_sweep_files_and_grid_sizes():
    assert SWEEPS == sorted(EXPECTED_POINTS)
    for name, n in EXPECTED_POINTS.items():
        assert len(grid(name)) == n, name


@pytest.mark.parametrize("name", SWEEPS)
def test_every_point_validates_and_reaches_the_config(name):
    seen = set()
    for point in grid(name):
        cfg = compose(BASE, f"+sweep={name}", *point)
        facts = validate(cfg, check_paths=False)
        keys = {o.split("=", 1)[0] for o in point}
        for override in point:
            key, value = override.split("=", 1)
            if key in GROUPS:  # a group choice: that option's values are the ones configured
                for k, v in group_option(key, value).items():
                    if f"{key}.{k}" not in keys and k not in (BASE_KEYS.get(key) or {}):
                        assert cfg[key][k] == v, (override, k)
            else:
                parsed = OverridesParser.create().parse_override(override).value()
                got = OmegaConf.select(cfg, key)
                got = OmegaConf.to_object(got) if OmegaConf.is_config(got) else got
                assert got == parsed, (override, got)
        # The axis shows in what the model does, not only in the config text.
        if name == "resolution":
            assert facts["image_size"] == cfg.encoder.image_size
        if name == "image_tokens":
            assert facts["tokens_per_view"] == cfg.connector.num_tokens
        seen.add(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True))
    assert len(seen) == len(grid(name))  # no two points compose to the same run


def test_connector_sweep_covers_all_eight_connectors():
    targets = {compose(BASE, "+sweep=connector", *p).connector._target_ for p in grid("connector")}
    assert len(targets) == 8


def test_multirun_launches_one_job_per_point(corpus, tmp_path: Path):
    """The smallest real sweep: data_mix on the smoke model, one step per job."""
    runs = tmp_path / "runs"
    res = run_cli(train_args(corpus, runs, "+sweep=data_mix", "train.max_steps=1",
                             "optim.warmup_steps=0", "eval.at_end=false", "logger=none",
                             multirun=True), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in runs.rglob("results.json")]
    assert len(results) == EXPECTED_POINTS["data_mix"]
    assert {r["status"] for r in results} == {"complete"}
    points = {o for r in results for o in r["overrides"] if o.startswith("data.weights=")}
    assert points == {p[0] for p in grid("data_mix")}
    # The caption-only point really trained on captions only.
    only = [p for p in runs.rglob("metrics.jsonl") if "caption_1.0" in p.parent.name]
    assert len(only) == 1
    last = [json.loads(line) for line in only[0].read_text().splitlines()][-1]
    assert last["data/share_caption"] == 1.0
