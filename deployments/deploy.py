"""Register the deployments that prefect.yaml defines, and keep its parameters equal to the presets.

    lmforge deploy                          # register every deployment in prefect.yaml
    lmforge deploy --name icd10-manual      # only that one
    lmforge deploy --dry-run                # print what would be registered; no server needed
    lmforge deploy --write-prefect-yaml     # regenerate prefect.yaml's presets from configs/

(`python -m deployments.deploy` takes the same options.) prefect.yaml is the one definition:
`prefect deploy --all` and this module read the same file. Each deployment's parameters are a preset
from configs/ with every field resolved, written into prefect.yaml's `definitions.presets` block (one
YAML anchor per preset) by `--write-prefect-yaml`; a test fails when a preset changes and the block was
not regenerated.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
WRITE_COMMAND = "lmforge deploy --write-prefect-yaml"


@dataclass(frozen=True)
class PlannedDeployment:
    """One deployment as prefect.yaml defines it, in the terms `flow.deploy()` takes."""

    name: str
    entrypoint: str
    work_pool_name: str
    parameters: dict[str, Any]
    crons: tuple[tuple[str, str | None], ...] = ()  # (cron, timezone) per schedule
    tags: tuple[str, ...] = ()
    description: str | None = None
    job_variables: dict[str, Any] | None = None  # the work pool's per-deployment settings (image, env, volumes)


def _read(prefect_yaml: Path) -> dict:
    spec = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8")) or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("deployments"), list):
        raise ValueError(f"{prefect_yaml}: expected a mapping with a `deployments` list")
    return spec


def _planned(entry: dict, where: str) -> PlannedDeployment:
    name = entry.get("name")
    if not name:
        raise ValueError(f"{where}: a deployment has no name")
    where = f"{where}, deployment {name!r}"
    pool = (entry.get("work_pool") or {}).get("name")
    if not pool or not entry.get("entrypoint"):
        raise ValueError(f"{where}: needs `entrypoint` and `work_pool.name`")
    if entry.get("pull"):
        # Ours deploy this checkout's directory; a pull step (code inside an image, a git clone) is Prefect's.
        raise ValueError(f"{where}: has its own `pull` steps (code in an image or a repository); register it with "
                         f"`prefect deploy --name {name}`, which runs them (docs/deployments.md)")
    crons = []
    for schedule in entry.get("schedules") or []:
        unsupported = set(schedule) - {"cron", "timezone"}
        if unsupported or "cron" not in schedule:
            raise ValueError(f"{where}: schedules here are `cron` (+ `timezone`); got {sorted(schedule)}")
        crons.append((schedule["cron"], schedule.get("timezone")))
    return PlannedDeployment(
        name=name,
        entrypoint=entry["entrypoint"],
        work_pool_name=pool,
        parameters=entry.get("parameters") or {},
        crons=tuple(crons),
        tags=tuple(entry.get("tags") or ()),
        description=entry.get("description"),
        job_variables=(entry.get("work_pool") or {}).get("job_variables"),
    )


def planned_deployments(prefect_yaml: Path = PREFECT_YAML) -> list[PlannedDeployment]:
    """What to deploy: every deployment in prefect.yaml. Pure: reads the file, talks to no server."""
    return [_planned(entry, str(prefect_yaml)) for entry in _read(prefect_yaml)["deployments"]]


def deploy(plans: list[PlannedDeployment]) -> list[str]:
    """Register `plans` with the Prefect API (PREFECT_API_URL, else a local ephemeral one); returns their ids."""
    from prefect import flow
    from prefect.schedules import Cron

    ids = []
    for plan in plans:
        source = flow.from_source(str(ROOT), entrypoint=plan.entrypoint)
        ids.append(str(source.deploy(
            name=plan.name,
            work_pool_name=plan.work_pool_name,
            schedules=[Cron(cron, timezone=tz) for cron, tz in plan.crons] or None,
            parameters=plan.parameters,
            tags=list(plan.tags),
            description=plan.description,
            job_variables=plan.job_variables,
            print_next_steps=False,
            ignore_warnings=True,  # the advice to use `.serve` for local development: workers are the point here
        )))
    return ids


def preset_parameters(preset: str) -> dict[str, Any]:
    """A deployment's parameters for a preset path relative to the repository: the config, fully resolved."""
    from components.config import load_config

    return {"config": load_config(ROOT / preset).model_dump(mode="json")}


def _anchor(preset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", Path(preset).stem)


def render_presets_block(presets: list[str]) -> str:
    """prefect.yaml's `definitions:` block: each preset's parameters under an anchor named after its file."""
    lines = [
        "definitions:",
        f"  # Generated by `{WRITE_COMMAND}` from the files named: do not edit by hand.",
        "  presets:",
    ]
    for preset in presets:
        body = yaml.safe_dump(preset_parameters(preset), sort_keys=False, width=1000, allow_unicode=True)
        lines.append(f"    {preset}: &{_anchor(preset)}")
        lines += [f"      {line}" for line in body.splitlines()]
    return "\n".join(lines) + "\n"


def write_prefect_yaml(prefect_yaml: Path = PREFECT_YAML) -> list[str]:
    """Regenerate the presets that prefect.yaml's `definitions.presets` names, keeping the rest of the file
    (comments included) as it is. Returns the presets written."""
    text = prefect_yaml.read_text(encoding="utf-8")
    presets = list((_read(prefect_yaml).get("definitions") or {}).get("presets") or {})
    if not presets:
        raise ValueError(f"{prefect_yaml}: no `definitions.presets` to regenerate (keys are paths like configs/demo-cpu.yaml)")
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == "definitions:"), None)
    if start is None:
        raise ValueError(f"{prefect_yaml}: the presets must sit in a block that starts with a `definitions:` line")
    # The block runs to the next line at column 0 (a top-level key or comment).
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith(" ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1  # keep the blank lines that separate the block from what follows
    prefect_yaml.write_text("".join(lines[:start]) + render_presets_block(presets) + "".join(lines[end:]), encoding="utf-8")
    return presets


class PrefectAPIUnreachable(RuntimeError):
    """The Prefect API that the deployments would be registered with does not answer."""


def check_api_reachable() -> None:
    """Fail in a line, before the flow is loaded (tens of seconds), when the Prefect API does not answer."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
        url = client.api_url
    if error is not None:
        raise PrefectAPIUnreachable(
            f"the Prefect API at {url} does not answer ({type(error).__name__}: {error}); start it with "
            "`prefect server start --host 127.0.0.1` and point PREFECT_API_URL at it "
            "(`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`)")


def select(plans: list[PlannedDeployment], names: list[str]) -> list[PlannedDeployment]:
    """The plans called `names`, all of them when none are given; an unknown name is an error listing the known ones."""
    unknown = set(names) - {p.name for p in plans}
    if unknown:
        raise ValueError(f"not in prefect.yaml: {', '.join(sorted(unknown))}; there: {', '.join(p.name for p in plans)}")
    return [p for p in plans if p.name in names] if names else plans


def describe(plan: PlannedDeployment) -> str:
    """One line saying what registering `plan` sets up: flow, pool, schedules, the parameters besides the config."""
    schedules = ", ".join(f"cron '{cron}' ({tz or 'UTC'})" for cron, tz in plan.crons) or "no schedule (runs when triggered)"
    extra = ", ".join(f"{k}={v}" for k, v in plan.parameters.items() if k != "config")
    return (f"{plan.name}: {plan.entrypoint} on work pool {plan.work_pool_name}, {schedules}"
            + (f"; parameters {extra}" if extra else ""))


def run_command(prefect_yaml: Path = PREFECT_YAML, names: list[str] | None = None, *,
                write_presets: bool = False, dry_run: bool = False) -> list[str]:
    """What `lmforge deploy` and `python -m deployments.deploy` do, as the lines they print: regenerate the
    presets, print the plan (`dry_run`), or register the deployments with the Prefect API."""
    if write_presets:
        return [f"{prefect_yaml.name}: parameters regenerated from {preset}" for preset in write_prefect_yaml(prefect_yaml)]
    plans = select(planned_deployments(prefect_yaml), names or [])
    if dry_run:
        return [f"would register {describe(plan)}" for plan in plans]
    check_api_reachable()
    return [f"registered {describe(plan)}: id {dep_id}" for plan, dep_id in zip(plans, deploy(plans), strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", action="append", help="Deploy only this deployment (repeatable); default all.")
    parser.add_argument("--write-prefect-yaml", action="store_true",
                        help="Regenerate prefect.yaml's presets from configs/ instead of deploying.")
    parser.add_argument("--dry-run", action="store_true", help="Print what would be registered; register nothing.")
    parser.add_argument("--file", type=Path, default=PREFECT_YAML, help="The prefect.yaml to read (default: the repository's).")
    args = parser.parse_args(argv)
    try:
        lines = run_command(args.file, args.name, write_presets=args.write_prefect_yaml, dry_run=args.dry_run)
    except (ValueError, PrefectAPIUnreachable) as exc:
        parser.error(str(exc))
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
