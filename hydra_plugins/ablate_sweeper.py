"""Pre-flight for sweeps (``hydra/sweeper=ablate``, the default of ablate-train's
multiruns; ``hydra/sweeper=basic`` opts out): Hydra's basic sweeper that composes and
validates every point before the launcher submits any of them.

Hydra hands the launcher batches of points; a bad point found by its job would surface
only after the others were queued (on SLURM, hours later). Here the sweep is expanded
first, each point is composed as its job will be, checked by ``ablate.validate`` (types,
batch divisibility, experts vs expert-parallel size, ...) at the world size the launcher
will give it, and the points' run directories are compared. Any problem: every one is
printed with the point's overrides, and nothing is launched (exit status 2).

Lives in ``hydra_plugins`` because Hydra only instantiates plugins from that package.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict


class AblateSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        problems = self.preflight(arguments)
        if problems:
            print(f"ablate pre-flight: {len(problems)} problem(s); nothing was launched:",
                  file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            sys.exit(2)
        return super().sweep(arguments)

    def points(self, arguments: list[str]) -> list[list[str]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        return self.split_arguments(overrides, None)[0]

    def preflight(self, arguments: list[str]) -> list[str]:
        from ablate.validate import ConfigError, validate

        launcher = self.config.hydra.launcher
        world = int(launcher.get("nodes") or 1) * int(launcher.get("tasks_per_node") or 1)
        problems, dirs = [], defaultdict(list)
        saved = HydraConfig.instance().cfg
        try:
            for point in self.points(arguments):
                where = " ".join(point) or "(no overrides)"
                try:
                    cfg = self.hydra_context.config_loader.load_sweep_config(self.config, point)
                    with open_dict(cfg.hydra.job):
                        cfg.hydra.job.num = 0  # what the launcher sets; resolvers may read it
                    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the run dir
                    run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
                    dirs[str(run_dir)].append(where)
                    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                    validate(task, world_size=world)
                except ConfigError as e:
                    problems += [f"[{where}] {p}" for p in e.problems]
                except Exception as e:  # composition: unknown key, wrong type, missing option
                    problems.append(f"[{where}] {type(e).__name__}: {e}".replace("\n", " "))
        finally:
            if saved is not None:
                HydraConfig.instance().set_config(saved)
        for d, who in dirs.items():
            if len(who) > 1:
                problems.append(f"points share the run directory {d}: " + "; ".join(who))
        return problems
