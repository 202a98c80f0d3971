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

SPEC_HELP = ("give models:/NAME@alias (or models:/NAME/VERSION; add /VARIANT for a quantized variant: "
             "models:/NAME@champion/nf4), a stage output dir (.lmforge/artifacts/sft/<key>, quantize/<key>), a model "
             "directory (with config.json), a PEFT adapter dir, a .gguf file, or embedded:smollm2-135m-instruct")
REGISTRY_SPEC_FORMS = "models:/NAME@alias or models:/NAME/VERSION, optionally followed by /VARIANT"
MERGED = "merged"  # the variant name of the registered checkpoint itself


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


@dataclass(frozen=True)
class RegistrySpec:
    """A parsed `models:/` MODEL: the registered name, an alias or a pinned version, and a variant (None: the
    registered checkpoint itself)."""

    name: str
    alias: str | None
    version: str | None
    variant: str | None = None


def parse_registry_spec(spec: str) -> RegistrySpec:
    """`models:/NAME@alias[/VARIANT]` or `models:/NAME/VERSION[/VARIANT]` (VARIANT: a quantized copy registered
    with the version, e.g. nf4 or gguf-q4_0)."""
    body = spec[len("models:/"):]
    if "@" in body:
        name, rest = body.split("@", 1)
        alias, slash, variant = rest.partition("/")
        if name and alias and "/" not in name + variant and (variant or not slash):
            return RegistrySpec(name, alias, None, variant or None)
    else:
        parts = body.split("/")
        if len(parts) in (2, 3) and all(parts) and parts[1].isdigit():
            return RegistrySpec(parts[0], None, parts[1], parts[2] if len(parts) == 3 else None)
    raise ServeSpecError(f"MODEL {spec!r}: a registry spec is {REGISTRY_SPEC_FORMS} (models:/NAME@champion/nf4)")


def alias_version(client, name: str, alias: str) -> str:
    """The version the alias points at now (what the follower polls)."""
    return str(client.get_model_version_by_alias(name, alias).version)


def registered_variants(client, name: str, version: str) -> list[str]:
    """The quantized variants registered with a version: the folders under its model run's `variants/`
    artifact (what the register stage uploads from the quantize stage), `merged` (the version itself) first."""
    from components.registry import VARIANTS_ARTIFACT

    run_id = client.get_model_version(name, version).run_id
    found = sorted(Path(f.path).name for f in client.list_artifacts(run_id, VARIANTS_ARTIFACT) if f.is_dir)
    return [MERGED, *found]


def pick_variant(wanted: str, available: list[str]) -> str | None:
    """`wanted` among `available`, where a GGUF type alone (`q4_0`) names its `gguf-q4_0` folder; None if absent."""
    for candidate in (wanted, f"gguf-{wanted}"):
        if candidate in available:
            return candidate
    return None


def download_variant(client, name: str, version: str, variant: str, cache: Path) -> str:
    """Download a variant folder into `cache` once (renamed when whole) and return what loads it: the .gguf
    file of a GGUF variant, else the folder (a checkpoint with its quantization config)."""
    import mlflow.artifacts

    from components.registry import VARIANTS_ARTIFACT

    target = Path(cache) / f"{name}-v{version}-{variant}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            run_id = client.get_model_version(name, version).run_id
            got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=tmp, tracking_uri=client.tracking_uri,
                                                           artifact_path=f"{VARIANTS_ARTIFACT}/{variant}"))
            got.rename(target)
    ggufs = sorted(target.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ServeSpecError(f"variant {variant} of {name} version {version} holds {len(ggufs)} .gguf files "
                             f"({', '.join(p.name for p in ggufs)}); expected one")
    return str(ggufs[0] if ggufs else target)


def resolve_registry_model(spec: str, cfg: PipelineConfig, *, client=None, version: str | None = None) -> ServedModel:
    """Download the version `spec` names (or `version`, when given: the follower already read the alias), or the
    variant it names, into the workspace's registry cache, once per version and variant."""
    from mlflow.exceptions import MlflowException

    from components.registry import resolve_registry_uri

    parsed = parse_registry_spec(spec)
    client = client or registry_client(cfg)
    cache = Path(cfg.workspace) / "registry-cache"
    try:
        version = version or parsed.version or alias_version(client, parsed.name, parsed.alias)
        variant = None
        if parsed.variant not in (None, MERGED):
            available = registered_variants(client, parsed.name, version)
            variant = pick_variant(parsed.variant, available)
        if parsed.variant not in (None, MERGED) and variant is None:
            raise ServeSpecError(
                f"MODEL {spec!r}: version {version} of {parsed.name} has no variant {parsed.variant!r}; its variants: "
                f"{', '.join(available)} (a GGUF one also by its type alone: q8_0 for gguf-q8_0). The quantize "
                "stage makes them (quantize.methods, quantize.gguf); `lmforge serve models:/NAME@alias` serves merged")
        source = (download_variant(client, parsed.name, version, variant, cache) if variant else
                  str(resolve_registry_uri(client, f"models:/{parsed.name}/{version}", cache)))
    except MlflowException as exc:
        raise ServeSpecError(f"MODEL {spec!r}: not in the registry at {cfg.tracking_uri()} ({exc.message}); "
                             f"check the name and alias (`lmforge promote` sets @champion), or pass --config "
                             f"for another workspace; {SPEC_HELP}") from None
    public = f"{parsed.name}@{parsed.alias}" if parsed.alias else f"{parsed.name}/{version}"
    return ServedModel(name=public + (f"/{variant}" if variant else ""), source=source, version=str(version),
                       spec=spec, follows=(parsed.name, parsed.alias) if parsed.alias else None,
                       info={"variant": variant or MERGED})


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
