"""What a stage function receives and returns: the contract between the stage table
(components/pipeline.py), the stages (components/*) and the task that runs them (tasks/stages.py).

Every stage function is `fn(cfg, inputs: StageInputs, out_dir) -> StageResult`. These types sit below
both the table and the stages, so a stage module (components/models/prepare.py) that the table itself
calls imports them without importing the table back. Plain data, no heavy imports: they cross processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from components.artifacts import StageResult  # noqa: F401  (the other half of the contract, importable here)

MetricsSink = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class BaseModelRef:
    """A base model as `from_pretrained` loads it: a local directory or a hub id pinned to a commit."""

    source: str
    revision: str | None = None
    trust_remote_code: bool = False

    def load_kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}


@dataclass(frozen=True)
class RunInfo:
    """The flow run a stage belongs to; plain data, so it crosses processes. Stages that write to
    MLflow themselves (register) log under `parent_run_id`."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    flow_run_id: str
    config_digest: str
    git_commit: str = "unknown"


@dataclass
class StageInputs:
    """What a stage reads: the manifests of its upstream nodes, a sink for per-step metrics, the run."""

    node: str
    kind: str
    upstream: dict[str, dict]
    metrics: MetricsSink = field(default=lambda step, values: None)
    run: RunInfo | None = None
    reads: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # the row's StageSpec.reads
    # The stage's own MLflow run: a training launched in other processes (DeepSpeed) logs its curve there.
    stage_run_id: str | None = None

    def dir(self, node: str, reading: Iterable[str] = ()) -> Path:
        """The output directory of upstream `node`. Where the stage table keys this stage on some of that
        node's files only (StageSpec.reads), name the files read from it in `reading`: any other is
        refused, since its changes would not reach the key."""
        if node not in self.upstream:
            raise KeyError(f"stage {self.node} has no input {node!r}; its inputs: {', '.join(self.upstream) or 'none'}")
        patterns = self.reads.get(node)
        if patterns is not None:
            names = list(reading)
            unkeyed = [n for n in names if not reads_file(patterns, n)] or ([] if names else ["(files not named)"])
            if unkeyed:
                raise KeyError(f"stage {self.node} reads {', '.join(unkeyed)} of {node}, but its row of the stage "
                               f"table keys it on {', '.join(patterns)} of {node} only: add the file to the row's "
                               "`reads`")
        return Path(self.upstream[node]["dir"])

    def file(self, node: str, name: str) -> Path:
        """The path of the upstream file `name` of `node` (checked against StageSpec.reads, as in `dir`)."""
        return self.dir(node, reading=[name]) / name

    def has(self, node: str) -> bool:
        return node in self.upstream

    @property
    def base_model(self) -> BaseModelRef:
        """The base model the `prepare` stage made loadable (a local dir, or a hub id at a fixed commit)."""
        info = self.upstream["prepare"]["info"]
        return BaseModelRef(info["source"], info.get("revision"), info.get("trust_remote_code", False))

    def adapter_stack(self) -> list[Path]:
        """The adapters to merge over the base, in training order: the longest stack among the inputs
        (sft's stack already holds cpt's adapter below its own)."""
        stacks = [m["info"]["adapter_stack"] for m in self.upstream.values() if "adapter_stack" in m.get("info", {})]
        return [Path(p) for p in max(stacks, key=len, default=[])]


def reads_file(patterns: tuple[str, ...], name: str) -> bool:
    return any(fnmatch(name, p) for p in patterns)
