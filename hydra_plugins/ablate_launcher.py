"""``hydra/launcher=slurm``: Hydra's submitit SLURM launcher plus a code snapshot.

At the first launch of a sweep the sources are copied to ``<sweep dir>/.code/<hash>/``
(ablate/snapshot.py) and every job of the sweep runs from that copy:

- Python: the sbatch script exports ``PYTHONPATH=<snapshot>`` and ``PYTHONSAFEPATH=1``.
  The second matters: ``python -m submitit.core._submit`` would otherwise put the job's
  working directory (the directory the sweep was submitted from, usually the checkout)
  first on ``sys.path``, ahead of the snapshot. The editable install's finder comes after
  ``sys.path`` entries, so the snapshot also wins over it. The job's working directory
  itself is unchanged: relative ``paths.*`` keep meaning what they meant at submission.
- Configs: the job composes its point again from the search path pickled with this
  launcher; the entry for the checkout's ``conf/`` is pointed at the snapshot's.
- The launcher object is unpickled in the job from ``hydra_plugins.ablate_launcher``,
  i.e. from the snapshot too, and prints which code the job runs before starting it.

``hydra.launcher.snapshot=false`` (or ``ABLATE_SNAPSHOT=0``) submits without a snapshot.
Lives in ``hydra_plugins`` because Hydra only instantiates plugins from that package.
"""

# No `from __future__ import annotations`: Hydra execs plugin modules without registering
# them in sys.modules, and dataclasses then cannot resolve string annotations.

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.types import HydraContext
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


@dataclass
class SnapshotSlurmQueueConf(SlurmQueueConf):
    """The submitit SLURM launcher's keys plus ``snapshot`` (conf/hydra/launcher/slurm.yaml)."""

    _target_: str = "hydra_plugins.ablate_launcher.SnapshotSlurmLauncher"
    snapshot: bool = True


ConfigStore.instance().store(group="hydra/launcher", name="ablate_slurm",
                             node=SnapshotSlurmQueueConf, provider="ablate")


class SnapshotSlurmLauncher(SlurmLauncher):
    def __init__(self, snapshot: bool = True, **params: Any) -> None:
        super().__init__(**params)
        self.snapshot = snapshot
        self.code: str | None = None  # the snapshot directory, once made

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ablate import snapshot

        assert self.config is not None and self.hydra_context is not None
        if snapshot.enabled(self.snapshot) and self.code is None:  # once per sweep, not per batch
            root = snapshot.source_root()
            code = snapshot.create(Path(str(self.config.hydra.sweep.dir)) / ".code", root)
            self.code = str(code)
            q = shlex.quote(self.code)
            self.params["setup"] = [
                f"export PYTHONPATH={q}${{PYTHONPATH:+:$PYTHONPATH}}",
                "export PYTHONSAFEPATH=1",
                f"export ABLATE_CODE={q}",
                *(self.params.get("setup") or []),
            ]
            self.hydra_context = _retarget(self.hydra_context, root / "conf", code / "conf")
            print(f"[ablate] code snapshot for the jobs: {snapshot.describe(code)}", file=sys.stderr)
        return super().launch(job_overrides, initial_job_idx)

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Runs in the job: say which code runs, then compose and run the point."""
        from ablate import snapshot

        where = snapshot.describe()
        print(f"[ablate] code: {where}", flush=True)
        if self.code and not str(snapshot.source_root()).startswith(self.code):
            print(f"[ablate] WARNING: submitted with snapshot {self.code} but imported ablate from "
                  f"{snapshot.source_root()} (Python < 3.11 ignores PYTHONSAFEPATH)", file=sys.stderr, flush=True)
        return super().__call__(*args, **kwargs)


def _retarget(ctx: HydraContext, old: Path, new: Path) -> HydraContext:
    """A context whose config loader reads ``new`` wherever the search path had ``old``."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    olds = {str(old), f"file://{old}", str(old.resolve()), f"file://{old.resolve()}"}
    csp = ConfigSearchPathImpl()
    hit = False
    for el in ctx.config_loader.get_search_path().get_path():
        path = el.path
        if path in olds:
            path, hit = (f"file://{new}" if path.startswith("file://") else str(new)), True
        csp.append(el.provider, path)
    if not hit:
        print(f"[ablate] WARNING: {old} is not on Hydra's config search path; jobs compose "
              f"their configs from the search path as it was", file=sys.stderr)
    return HydraContext(config_loader=ConfigLoaderImpl(config_search_path=csp), callbacks=ctx.callbacks)
