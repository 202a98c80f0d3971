"""The stage contract sits below the stage table, and the table is the one place evaluation nodes are named."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from components import pipeline, run_summary, stage_contract
from components.pipeline import EVALUATION_NODES, STAGE_TABLE, STAGES_BY_NAME

ROOT = Path(__file__).resolve().parents[2]


def test_a_stage_module_the_table_calls_imports_the_contract_without_the_table():
    # components.models.prepare (the prepare row; the table calls its base_adaptation for keys) needs StageInputs.
    code = ("import sys, components.models.prepare, components.stage_contract; "
            "assert 'components.pipeline' not in sys.modules, 'prepare imported the stage table'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    # The table's module still gives the contract's names (importers not yet switched keep working).
    for name in ("StageInputs", "RunInfo", "BaseModelRef", "MetricsSink", "reads_file"):
        assert getattr(pipeline, name) is getattr(stage_contract, name)


def test_evaluation_nodes_come_from_the_table_in_its_order():
    rows = [s for s in STAGE_TABLE if s.kind == "evaluate"]
    assert list(EVALUATION_NODES.values()) == [s.name for s in rows]
    assert list(EVALUATION_NODES) == ["base", "cpt", "adapted", "aligned"]
    assert list(run_summary.EVALUATIONS) == [s.name for s in rows]  # the summary's columns, base first
    register, promote = STAGES_BY_NAME["register"], STAGES_BY_NAME["promote"]
    assert set(EVALUATION_NODES.values()) <= set(register.upstream)
    assert {EVALUATION_NODES[m] for m in ("base", "adapted", "aligned")} == set(promote.upstream) - {"register"}


def test_no_module_but_the_table_spells_an_evaluation_node_name():
    names = set(EVALUATION_NODES.values())
    files = [p for d in ("components", "flows", "tasks") for p in (ROOT / d).rglob("*.py")
             if p != ROOT / "components" / "pipeline.py" and "evaluation" not in p.relative_to(ROOT).parts]
    spelled = [(str(p.relative_to(ROOT)), node.lineno) for p in files for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.Constant) and node.value in names]
    assert not spelled, f"read the names from components.pipeline.EVALUATION_NODES instead: {spelled}"
