"""Ten flow runs at once on the production setup: PostgreSQL, `mlflow server` on it with proxied artifacts,
`prefect server` on it, three process workers polling one pool, the tiny random model.

    python bench/load_test.py [--runs 10] [--workers 3] [--limit 1] [--out bench/results_load.json]

The runs mix identical and changed configs (the deployment's preset; sft.learning_rate changed; the
evaluation's answer length changed; cpt.learning_rate changed), triggered together with `run_deployment`.
All share one workspace on this machine, whose per-stage lock makes a second run wait for a stage another
is computing and adopt it. Records the runs, their states, the wall time from the first trigger to the last
end, the stages computed against the distinct stage keys (duplicates: a key computed twice), MLflow runs
left RUNNING, and the registry's versions with their lineage; bench/run_bench.py renders the JSON into
RESULTS.md. Needs Debian's PostgreSQL (`apt-get install -y postgresql`); under root it runs as `postgres`.

Run it from a checkout nobody edits meanwhile (`git worktree add /tmp/lmforge-bench HEAD`, then run this file
there): a stage's key includes its code's source, so a commit landing between two runs that use the same config
makes the later one recompute the stages that code touches, and register a second version, by design.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def run(runs: int, workers: int, limit: int, timeout: float) -> dict:
    from tests.conftest import tiny_pipeline_config
    from tests.deployments.stack import LOAD_VARIANTS, load_test, running_stack
    from tests.postgres import running_postgres, skip_reason
    from tests.tiny_model import build_tiny_model

    if reason := skip_reason():
        sys.exit(f"cannot start PostgreSQL: {reason}")
    chosen = [LOAD_VARIANTS[i % len(LOAD_VARIANTS)] for i in range(runs)]
    with tempfile.TemporaryDirectory(prefix="lmforge-load-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny-model")
        load_before = os.getloadavg()[0]
        with running_postgres() as postgres, running_stack(postgres, root / "stack") as stack:
            cfg = tiny_pipeline_config(model, root / "ws", **{
                "tracking.tracking_uri": stack.mlflow_url, "tracking.experiment": "load",
                "registry.model_name": "tiny-load"})
            figures = load_test(stack, cfg, [p for _, p in chosen], pool="load", workers=workers, limit=limit,
                                timeout=timeout)
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "workers": workers,
        "limit_per_worker": limit,
        "configs": {name: sum(1 for n, _ in chosen if n == name) for name, _ in dict(chosen).items()},
        "distinct_configs": len({n for n, _ in chosen}),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--limit", type=int, default=1, help="flow runs one worker runs at once")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for every run to end")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_load.json")
    args = parser.parse_args()
    result = run(args.runs, args.workers, args.limit, args.timeout)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = (result["completed"] == result["runs"] and result["duplicates"] == 0 and not result["never_computed"]
          and result["mlflow_runs_running"] == 0 and not result["lineage_errors"]
          and result["registry_versions"] == result["distinct_configs"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
