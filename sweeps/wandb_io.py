"""wandb as a source of runs for ``ablate-compare`` (``--wandb``), and the workspace it
can build (``--wandb-report``).

Sources:

- ``--wandb DIR``, a directory holding offline wandb runs (``offline-run-*``). The wandb
  SDK (0.31) offers no reader of the ``.wandb`` files it writes offline (only
  ``wandb sync`` decodes them, by uploading), so each offline run is traced back to the
  ablate run directory it was written in (``Tracker`` uses ``dir=<run dir>``, so wandb's
  files live in ``<run dir>/wandb/``) and that directory's ``results.json`` /
  ``metrics.jsonl`` are read instead. An offline run without its run directory is
  listed as unreadable, with the way out (``wandb sync``, then the API).
- ``--wandb ENTITY/PROJECT[/GROUP]`` (not a directory): the public API
  (``wandb.Api().runs``, filtered on the group = sweep name), needing a login. Axes
  come from the ``override.<key>`` config keys every run carries (``ablate/tracking.py``),
  else from its tags (= its overrides); metrics from the run summary.

``--wandb-report`` plans one workspace per sweep: runs filtered to the sweep's group,
grouped by ``override.<axis>`` for every swept axis, a section per metric with a bar
chart of the group means with std bands, and the training loss curves. With a wandb
login and ``wandb-workspaces`` installed (``pip install 'ablate[wandb-report]'``) it is
saved; offline it is printed and nothing is created.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from sweeps.runs import Run, load_run, parse_overrides

OFFLINE_PREFIXES = ("offline-run-", "run-")
OVERRIDE_PREFIX = "override."


# --- Reading runs ---

def _wandb_run_dirs(root: Path, depth: int = 0) -> list[Path]:
    found = []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    for d in children:
        if d.name.startswith(OFFLINE_PREFIXES) and any(d.glob("*.wandb")):
            found.append(d)
        elif depth < 6 and not d.name.startswith((".", "checkpoints")):
            found += _wandb_run_dirs(d, depth + 1)
    return found


def offline_runs(wandb_dir: str | os.PathLike) -> list[Run]:
    """The ablate runs behind the offline wandb runs under ``wandb_dir`` (each once, however
    many times it was resumed)."""
    runs, seen = [], set()
    for d in _wandb_run_dirs(Path(wandb_dir)):
        owner = d.parent.parent if d.parent.name == "wandb" else None
        if owner is not None and any((owner / m).exists() for m in ("results.json", ".hydra", "metrics.jsonl")):
            if owner not in seen:
                seen.add(owner)
                runs.append(load_run(owner, owner.name))
            continue
        runs.append(Run(name=d.name, path=d, status="incomplete", error=(
            "offline wandb run without its ablate run directory; the wandb SDK has no reader "
            "for .wandb files: `wandb sync` it and use --wandb ENTITY/PROJECT")))
    return runs


def _plain_config(config: dict) -> dict:
    # The API returns values, older exports {"value": v, "desc": ...}.
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}


STATES = {"finished": "complete", "failed": "failed", "crashed": "failed", "killed": "failed"}


def api_runs(path: str, api=None) -> list[Run]:
    """Runs of ``ENTITY/PROJECT[/GROUP]`` through the wandb public API."""
    parts = path.strip("/").split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"--wandb {path!r}: want a directory of offline runs or ENTITY/PROJECT[/GROUP]")
    if api is None:
        import wandb

        api = wandb.Api()
    project = "/".join(parts[:2])
    filters = {"group": parts[2]} if len(parts) == 3 else None
    runs = []
    for wr in api.runs(project, filters=filters):
        config = _plain_config(dict(wr.config or {}))
        overrides = {k[len(OVERRIDE_PREFIX):]: str(v) for k, v in config.items()
                     if k.startswith(OVERRIDE_PREFIX)}
        if not overrides:
            overrides = parse_overrides(list(wr.tags or []))
        summary = dict(wr.summary_metrics or {})
        metrics = {k: v for k, v in summary.items() if not k.startswith("_")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        status = STATES.get(wr.state, "incomplete")
        results = {"run_name": wr.name, "status": status, "metrics": metrics,
                   "step": summary.get("_step"), "wandb_id": wr.id}
        run = Run(name=str(wr.name), path=Path(f"wandb:{project}/{wr.id}"), overrides=overrides,
                  results=results, status=status,
                  error=None if status == "complete" else f"wandb state {wr.state!r}")
        runs.append(run)
    return runs


def read_wandb(source: str) -> list[Run]:
    return offline_runs(source) if Path(source).is_dir() else api_runs(source)


# --- The workspace ---

def online() -> bool:
    """A wandb login is usable: not in offline/disabled mode, and an API key is set
    (``WANDB_API_KEY`` or ``~/.netrc``, where ``wandb login`` writes it)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def report_plan(group: str, axes: list[str], metrics: list[str], entity: str | None,
                project: str) -> dict:
    """What ``--wandb-report`` creates, as plain data (printed offline, built online)."""
    return {
        "workspace": f"ablate sweep {group}", "entity": entity, "project": project, "group": group,
        "filter": f"Metric('Group') == '{group}'",
        "group_by": [f"{OVERRIDE_PREFIX}{a}" for a in axes],
        "sections": [{"name": m, "panel": f"bar chart of {m}: mean over the runs of each group, "
                                          "std band"} for m in metrics]
                    + [{"name": "training", "panel": "line plot of train/loss against Step"}],
    }


def describe_plan(plan: dict) -> str:
    where = f"{plan['entity'] or '<default entity>'}/{plan['project']}"
    lines = [f"would create wandb workspace {plan['workspace']!r} in {where}:",
             f"  runs: {plan['filter']}",
             f"  grouped by config: {', '.join(plan['group_by']) or '(no swept axes)'}"]
    lines += [f"  section {s['name']!r}: {s['panel']}" for s in plan["sections"]]
    return "\n".join(lines)


def build_workspace(plan: dict, save: bool = True):
    """The planned workspace as a ``wandb_workspaces`` object, saved unless ``save`` is
    False (needs ``wandb-workspaces``, and a login to save); ``.url`` after saving."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    sections = [ws.Section(name=s["name"], is_open=True, panels=[
        wr.BarPlot(title=s["name"], metrics=[s["name"]], groupby_aggfunc="mean",
                   groupby_rangefunc="stddev")]) for s in plan["sections"][:-1]]
    sections.append(ws.Section(name="training", is_open=True,
                               panels=[wr.LinePlot(x="Step", y=["train/loss"])]))
    entity = plan["entity"]
    if not entity:
        import wandb

        entity = wandb.Api().default_entity
    workspace = ws.Workspace(
        name=plan["workspace"], entity=entity, project=plan["project"], sections=sections,
        runset_settings=ws.RunsetSettings(filters=[expr.Metric("Group") == plan["group"]],
                                          groupby=[expr.Config(k) for k in plan["group_by"]]))
    if save:
        workspace.save()
    return workspace
