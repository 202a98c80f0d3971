"""Cache keys: hash(stage, resolved stage config, upstream manifest digests, stage code version).

No run id goes in: an unchanged stage is reused across runs and days. The code version is a hash of
the source of every component module the stage's code can reach, found by following `components.*`
imports from its entry module, so editing any code a stage runs invalidates its cache (and, through
the manifest digests, everything downstream).
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

import components
from components.config import hash_json

# The module whose run_* function each stage calls.
STAGE_ENTRY: dict[str, str] = {
    "fetch": "components.data.fetch",
    "align": "components.data.align",
    "tokenize": "components.data.tokenize",
    "cpt": "components.training.sft",
    "sft": "components.training.sft",
    "evaluate": "components.evaluation.evaluate",
    "quantize": "components.quantization.quantize",
    "register": "components.registry",
}
# Reached by every stage but not deciding what a stage writes: the config schema (the resolved
# stage config is in the key already), manifests and atomic writes, MLflow calls, memory figures.
# Hashing them would make a docstring edit there recompute every stage.
NOT_OUTPUT = {"components.config", "components.artifacts", "components.tracking", "components.resources"}


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
def stage_modules(stage: str) -> tuple[str, ...]:
    """Every component module reachable from the stage's entry module, sorted, NOT_OUTPUT left out."""
    seen, todo = set(), [STAGE_ENTRY[stage]]
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_OUTPUT:
            continue
        seen.add(module)
        todo += _imported_components(module)
    return tuple(sorted(seen))


@cache
def code_version(stage: str) -> str:
    h = hashlib.sha256()
    for name in stage_modules(stage):
        h.update(name.encode() + b"\0" + _source(name).encode())
    return h.hexdigest()[:16]


def stage_key(node: str, stage: str, config: dict, upstream: dict[str, str]) -> str:
    """`node` names the graph node (evaluate-base), `stage` its kind (evaluate), whose code is hashed."""
    return hash_json({"stage": node, "config": config, "upstream": upstream, "code": code_version(stage)})[:24]


def file_fingerprint(path: Path, full_hash_limit: int = 256 << 20) -> str:
    """Content hash of a local source file (size + mtime for files beyond the limit, to keep keys cheap)."""
    st = path.stat()
    if st.st_size > full_hash_limit:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    from components.artifacts import sha256_file

    return sha256_file(path)
