"""Cache keys: hash(stage, resolved stage config, upstream digests, stage code version).

The base model's content reaches every model stage through the `prepare` stage's digest, and
tokenization through the tokenizer's own digest (components.models.prepare). An upstream digest is the
digest of the files the stage reads from that node where its row lists them (StageSpec.reads), else the
node's whole manifest digest.

No run id goes in: an unchanged stage is reused across runs and days. The code version is a hash of
the source of every component module the stage's code can reach, found by following `components.*`
imports from its entry module, so editing any code a stage runs invalidates its cache (and, through
the upstream digests, every later stage that reads a file whose content changed).
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

import components
from components.config import hash_json
from components.pipeline import STAGES_BY_NAME

# Reached by every stage but not deciding what a stage writes: the config schema (config*.py; the resolved
# stage config is in the key already), manifests and atomic writes, MLflow calls and uploads, the shared
# stage store, memory figures, the stage contract types (components.stage_contract, as pipeline.py held them).
# Hashing them would make a docstring edit there recompute every stage.
NOT_OUTPUT = {"components.config", "components.config_base", "components.config_training",
              "components.config_alignment", "components.artifacts", "components.tracking",
              "components.resources", "components.pipeline", "components.errors", "components.runtime",
              "components.mlflow_outputs", "components.shared_cache", "components.stage_contract"}


_ROOT = Path(components.__file__).resolve().parents[1]


def _module_file(module: str) -> Path | None:
    """The source file of a components.* module (None where the name is not a module: a class or function)."""
    base = _ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def _source(module: str) -> str:
    path = _module_file(module)
    if path is None:
        raise ModuleNotFoundError(f"cache keys: no source file for {module} under {_ROOT}")
    return path.read_text(encoding="utf-8")


@cache
def _imported_components(module: str) -> frozenset[str]:
    """The components.* modules a module imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(_source(module))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("components.") and _module_file(n) is not None}
    return frozenset(found)


@cache
def stage_modules(node: str) -> tuple[str, ...]:
    """Every component module reachable from the node's entry module, sorted, NOT_OUTPUT left out."""
    seen, todo = set(), [STAGES_BY_NAME[node].module]
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_OUTPUT:
            continue
        seen.add(module)
        todo += _imported_components(module)
    return tuple(sorted(seen))


@cache
def code_version(node: str) -> str:
    h = hashlib.sha256()
    for name in stage_modules(node):
        h.update(name.encode() + b"\0" + _source(name).encode())
    return h.hexdigest()[:16]


def stage_key(node: str, config: dict, upstream: dict[str, str]) -> str:
    """Key of a node of the stage table: its name, its config slice, its keyed upstream digests, its code."""
    return hash_json({"stage": node, "config": config, "upstream": upstream, "code": code_version(node)})[:24]
