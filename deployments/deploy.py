"""Register lmforge's deployments with a Prefect server: a weekly cron run and a manual one.

    python -m deployments.deploy [--pool lmforge-local] [--cron "0 3 * * 1"] [--config configs/demo-cpu.yaml]

The flow's parameters are the typed pipeline config, so the UI renders a form for manual runs; the
deployment's default parameters come from the chosen YAML preset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/domain_adaptation.py:domain_adaptation"


def deploy(pool: str, cron: str | None, config_path: str | None, name_prefix: str = "icd10") -> list[str]:
    from prefect import flow

    from components.config import load_config

    params = {"config": load_config(config_path).model_dump(mode="json")} if config_path else {}
    source = flow.from_source(str(ROOT), entrypoint=ENTRYPOINT)
    ids = [str(source.deploy(name=f"{name_prefix}-manual", work_pool_name=pool, parameters=params, tags=["lmforge", "manual"]))]
    if cron:
        ids.append(str(source.deploy(name=f"{name_prefix}-scheduled", work_pool_name=pool, cron=cron,
                                     parameters=params, tags=["lmforge", "scheduled"])))
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="lmforge-local", help="Prefect work pool (type process).")
    parser.add_argument("--cron", default="0 3 * * 1", help="Schedule for the scheduled deployment; '' for none.")
    parser.add_argument("--config", default="configs/demo-cpu.yaml", help="Preset used as default parameters.")
    args = parser.parse_args()
    for dep_id in deploy(args.pool, args.cron or None, args.config):
        print(dep_id)


if __name__ == "__main__":
    main()
