"""Cache keys: hash(stage, resolved stage config, upstream manifest digests, stage code version).

No run id goes in: an unchanged stage is reused across runs and days. The code version is a hash of
the source of the component modules the stage runs, so editing a stage's code invalidates its cache
(and, through the manifest digests, everything downstream).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from functools import cache
from pathlib import Path

from components.config import hash_json

STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "fetch": ("components.data.fetch", "components.data.dataset_info"),
    "align": ("components.data.align", "components.data.formats", "components.data.dataset_info",
              "components.data.workers"),
    "tokenize": ("components.data.tokenize", "components.data.templates", "components.data.packing",
                 "components.data.workers"),
    "cpt": ("components.training.lora", "components.training.sft", "components.data.packing"),
    "sft": ("components.training.lora", "components.training.sft", "components.data.packing"),
    "evaluate": ("components.evaluation.evaluate", "components.evaluation.metrics"),
    "quantize": ("components.quantization.quantize", "components.evaluation.evaluate", "components.evaluation.metrics"),
    "register": ("components.registry",),
}


@cache
def code_version(stage: str) -> str:
    h = hashlib.sha256()
    for name in STAGE_MODULES[stage]:
        h.update(inspect.getsource(importlib.import_module(name)).encode())
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
