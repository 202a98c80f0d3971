"""What `lmforge serve MODEL` serves: MODEL resolved to a local directory (or GGUF file) and a public name."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.config import PipelineConfig

log = logging.getLogger(__name__)

SPEC_HELP = ("give models:/NAME@alias (or models:/NAME/VERSION), a stage output dir (.lmforge/artifacts/sft/<key>, "
             "quantize/<key>), a model directory (with config.json), a PEFT adapter dir, a .gguf file, or "
             "embedded:smollm2-135m-instruct")


class ServeSpecError(ValueError):
    """MODEL names nothing `lmforge serve` can serve; the message names the spec and what to give."""


@dataclass(frozen=True)
class ServedModel:
    """One model as served: `name` is what clients send as `model`; `source` + `adapters` is what loads it
    (a directory, a hub-style path or a .gguf file, and PEFT adapters to apply in order)."""

    name: str
    source: str
    adapters: tuple[str, ...] = ()
    version: str | None = None  # registry version, for models:/ specs
    spec: str = ""
    follows: tuple[str, str] | None = None  # (registered name, alias) when the spec names an alias
    info: dict = field(default_factory=dict, compare=False)

    @property
    def is_gguf(self) -> bool:
        return self.source.endswith(".gguf")


def registry_client(cfg: PipelineConfig):
    from components import tracking

    return tracking.client_for(cfg.tracking_uri())


def parse_registry_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@alias` -> (NAME, alias, None); `models:/NAME/VERSION` -> (NAME, None, VERSION)."""
    body = spec[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias:
            return name, alias, None
    elif body.count("/") == 1:
        name, version = body.split("/")
        if name and version.isdigit():
            return name, None, version
    raise ServeSpecError(f"MODEL {spec!r}: a registry spec is models:/NAME@alias or models:/NAME/VERSION")


def alias_version(client, name: str, alias: str) -> str:
    """The version the alias points at now (what the follower polls)."""
    return str(client.get_model_version_by_alias(name, alias).version)


def resolve_registry_model(spec: str, cfg: PipelineConfig, *, client=None, version: str | None = None) -> ServedModel:
    """Download the version `spec` names (or `version`, when given: the follower already read the alias) into the
    workspace's registry cache, once per version."""
    from mlflow.exceptions import MlflowException

    from components.registry import resolve_registry_uri

    name, alias, pinned = parse_registry_spec(spec)
    client = client or registry_client(cfg)
    try:
        version = version or pinned or alias_version(client, name, alias)
        directory = resolve_registry_uri(client, f"models:/{name}/{version}", Path(cfg.workspace) / "registry-cache")
    except MlflowException as exc:
        raise ServeSpecError(f"MODEL {spec!r}: not in the registry at {cfg.tracking_uri()} ({exc.message}); "
                             f"check the name and alias (`lmforge promote` sets @champion), or pass --config "
                             f"for another workspace; {SPEC_HELP}") from None
    public = f"{name}@{alias}" if alias else f"{name}/{version}"
    return ServedModel(name=public, source=str(directory), version=str(version), spec=spec,
                       follows=(name, alias) if alias else None)


def resolve_served_model(spec: str, cfg: PipelineConfig) -> ServedModel:
    """MODEL as the CLI takes it -> ServedModel, with errors that name the spec and say what to give."""
    from components.chat import resolve_chat_model
    from components.models.loading import BaseModelError

    if spec.startswith("models:/"):
        return resolve_registry_model(spec, cfg)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ServeSpecError(f"MODEL {spec!r}: no such GGUF file; {SPEC_HELP}")
        return ServedModel(name=path.stem, source=str(path.resolve()), spec=spec)
    if not path.exists() and not spec.startswith("embedded:"):
        raise ServeSpecError(f"MODEL {spec!r}: no such file or directory; {SPEC_HELP}")
    try:
        source, adapters = resolve_chat_model(spec, cfg)
    except (BaseModelError, ValueError, KeyError) as exc:
        raise ServeSpecError(f"MODEL {spec!r}: {exc}; {SPEC_HELP}") from None
    return ServedModel(name=public_name(spec), source=source, adapters=tuple(adapters), spec=spec)


def public_name(spec: str) -> str:
    """A short name for a local model: `sft-1a2b3c4d` for a stage dir, the directory's name otherwise."""
    if spec.startswith("embedded:"):
        return spec.split(":", 1)[1]
    path = Path(spec).resolve()
    manifest = path / "manifest.json"
    if manifest.is_file():
        stage = json.loads(manifest.read_text()).get("stage", path.parent.name)
        return f"{stage}-{path.name[:8]}"
    return path.name


def merged_directory(model: ServedModel, cache: Path) -> Path:
    """A directory holding `model` with its adapters merged in, saved once under `cache` (keyed by the source
    and the adapters' contents): transformers serve and llama.cpp load one checkpoint, not a stack."""
    if not model.adapters:
        return Path(model.source)
    from components.models.loading import content_stamp, load_tokenizer, load_with_adapters, select_hardware

    key = hashlib.sha256(repr((model.source, content_stamp(list(model.adapters)))).encode()).hexdigest()[:16]
    target = Path(cache) / key
    if (target / "config.json").is_file():
        return target
    log.info("merging %d adapter(s) into %s (once)", len(model.adapters), model.source)
    target.parent.mkdir(parents=True, exist_ok=True)
    hardware = select_hardware("cpu", "fp32")
    merged = load_with_adapters(model.source, list(model.adapters), hardware)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{key}.") as tmp:  # renamed when whole
        merged.save_pretrained(tmp)
        load_tokenizer(model.source).save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        Path(tmp).rename(target)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return target
