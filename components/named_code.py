"""Code the config names by a dotted path (a reward rule, a rule baseline's feature), as the cache keys see it.

A stage's code version (tasks/keys.py) follows the `import` statements of its modules. A function the config
names as `module:function` is imported by name while the stage runs, so that walk never reaches it: editing
components/alignment/icd10.py, or a user's own rule module, would reuse outputs scored with the old rule.
The stage table (StageSpec.loads_by_name) says which stage loads which config field; the source of the
module each names goes into that stage's key.

The module's file is found without importing it (a user's rule may import torch, and an unchanged rerun
imports none): its top-level package is located on sys.path and the rest of the dotted name walked as
directories. For a package, its `__init__.py` is hashed; what the module itself imports is not followed.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path

from components.config import ConfigError


def module_of(dotted: str) -> str:
    """The module part of `module:function` (or `module.function`, as components.alignment.rewards.load_rule
    reads it)."""
    module, sep, attr = dotted.partition(":")
    if not sep:
        module, _, attr = dotted.rpartition(".")
    return module if module and attr else ""


def _walk(module: str) -> Path | None:
    """The source file of `module` found on sys.path without importing it or its packages, or None. Each
    directory is searched as Python's path finder does: a package (`name/__init__.py`) before a module
    (`name.py`); bare `name/` directories are portions of a namespace package."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name is looked up, not imported
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and Path(spec.origin).is_file() else None
    places = [Path(p) for p in (spec.submodule_search_locations or [])]
    for i, part in enumerate(rest):
        last, portions, package = i == len(rest) - 1, [], None
        for place in places:
            if (place / part / "__init__.py").is_file():
                package = place / part
                break
            if (place / f"{part}.py").is_file():
                return place / f"{part}.py" if last else None  # a module has no submodules
            if (place / part).is_dir():
                portions.append(place / part)
        if package is not None:
            if last:
                return package / "__init__.py"
            places = [package]
        elif portions and not last:
            places = portions
        else:
            return None
    return None


def module_source(dotted: str, field: str) -> Path:
    """The source file of the module `dotted` names; a ConfigError naming `field` where there is none."""
    module = module_of(dotted)
    if not module:
        raise ConfigError(f"{field}: {dotted!r} is not a dotted path 'module:function'")
    path = _walk(module)
    if path is None:
        try:  # a module a custom importer provides (an extension, a zip): ask the import system itself
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            path = Path(spec.origin)
    if path is None:
        raise ConfigError(f"{field}: {dotted!r} names module {module!r}, which is not on the Python path "
                          f"(no {module.replace('.', '/')}.py found): install it, or add its directory to PYTHONPATH")
    return path


def named_code_digests(named: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Per config field, the dotted path it names and the sha256 of its module's source file."""
    out = {}
    for field, dotted in sorted(named.items()):
        source = module_source(dotted, field).read_bytes()
        out[field] = {"name": dotted, "sha256": hashlib.sha256(source).hexdigest()}
    return out
