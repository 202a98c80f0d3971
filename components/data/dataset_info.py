"""Dataset descriptions in LLaMA-Factory's `dataset_info.json` schema.

An existing LLaMA-Factory `dataset_info.json` is read as is. Our extensions:

- `url` (+ `sha256` pin): an http(s) URL or any fsspec URI (s3://, gs://, memory://, ...).
- `revision` on a hub dataset: the commit, tag or branch to load (a pin: its current commit is not asked for).
- `formatting` also takes `openai`, `lmflow`, `text` and `prompt_completion` (see docs/data_formats.md).
- `sample_by` (`line` | `paragraph` | `file`): how a `.txt` file is split into text records.
- `tags.license`: a license note carried into the fetch provenance.
- `fill_placeholders`: the align stage replaces `{{name}}` and `{{author}}` in the aligned records
  with `data.identity_name` / `data.identity_author` (self-cognition data such as data/icd10/identity.json).
- `columns.task`: a per-row label copied into the aligned record as its top-level `task` (evaluation
  reports every metric per task).

LLaMA-Factory's `columns.kto_tag` (a bool per row: is the answer desirable) makes a dataset unpaired
preference data: it aligns to TRL's {"prompt", "completion", "label"} records (the `kto` data group).

`file_name` is resolved next to the `dataset_info.json` that names it (LLaMA-Factory's convention) and
must stay inside that directory: an absolute path, `..` or a symlink leading out is refused, naming the
dataset, unless `data.allow_outside_paths` is set (a description from elsewhere cannot make a run read,
copy and log any file of the machine).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Formatting = Literal["alpaca", "sharegpt", "openai", "lmflow", "text", "prompt_completion"]

# Row metadata: a column mapped under one of these keys is copied into the aligned record under that key.
METADATA_COLUMNS = ("task",)
# `columns` keys we align from; LLaMA-Factory's plus `completion`, `text` and the metadata columns.
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected",
               "kto_tag", "completion", "text", *METADATA_COLUMNS)
# LLaMA-Factory columns we refuse instead of silently dropping what they carry.
UNSUPPORTED_COLUMN_KEYS = {
    "images": "multimodal data is not supported",
    "videos": "multimodal data is not supported",
    "audios": "multimodal data is not supported",
}
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag",
            "license")


class DataError(ValueError):
    """Bad data or a bad dataset description; the message says what, where and what to do."""


class DatasetSpec(BaseModel):
    """One entry of a `dataset_info.json`; `name` is its key in that file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    file_name: str | None = Field(None, description="A file or directory in the dataset_info.json's directory "
                                  "(elsewhere, absolute or through '..', only with data.allow_outside_paths).")
    hf_hub_url: str | None = Field(None, description="A Hugging Face hub dataset id.")
    url: str | None = Field(None, description="An http(s) URL or fsspec URI (our extension).")
    sha256: str | None = Field(None, description="Expected sha256 of the file at `url` (our extension).")
    formatting: Formatting = "alpaca"
    ranking: bool = Field(False, description="A preference dataset (chosen/rejected).")
    subset: str | None = Field(None, description="Hub dataset config name.")
    split: str = "train"
    folder: str | None = Field(None, description="Folder inside the hub dataset repository.")
    revision: str | None = Field(None, description="Hub dataset commit, tag or branch to load (our extension).")
    num_samples: int | None = Field(None, ge=1, description="Keep at most this many rows (seeded sample).")
    columns: dict[str, str] = Field(default_factory=dict, description="Our column name -> the file's column name.")
    tags: dict[str, str] = Field(default_factory=dict, description="Message keys and role values (sharegpt).")
    sample_by: Literal["line", "paragraph", "file"] = Field(
        "line", description="How a .txt file becomes text records (our extension)."
    )
    fill_placeholders: bool = Field(
        False, description="Replace {{name}} and {{author}} with data.identity_name/identity_author (our extension)."
    )
    # LLaMA-Factory fields that we read without using: a file written for it loads unchanged.
    file_sha1: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be 64 hex characters (a sha256 digest)")
        return v.lower() if v else v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key in UNSUPPORTED_COLUMN_KEYS:
                raise ValueError(f"'{key}': {UNSUPPORTED_COLUMN_KEYS[key]}")
            if key not in COLUMN_KEYS:
                raise ValueError(f"unknown key '{key}'; known: {', '.join(COLUMN_KEYS)}")
        return v

    @field_validator("tags")
    @classmethod
    def _known_tags(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key not in TAG_KEYS:
                raise ValueError(f"unknown key '{key}'; known: {', '.join(TAG_KEYS)}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        given = [f for f in ("file_name", "hf_hub_url", "url") if getattr(self, f)]
        if len(given) > 1:
            raise ValueError(f"give one source, not {' and '.join(given)}")
        if not given:
            others = [f for f in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if getattr(self, f)]
            if others:
                raise ValueError(f"{', '.join(others)} is not supported; give file_name, url or hf_hub_url")
            raise ValueError("no source: give file_name, url or hf_hub_url")
        if self.sha256 and not self.url:
            raise ValueError("sha256 pins a `url`; this entry has none")
        if self.revision and not self.hf_hub_url:
            raise ValueError("revision pins a hub dataset (`hf_hub_url`); this entry has none")
        if "kto_tag" in self.columns and self.ranking:
            raise ValueError("columns.kto_tag labels single answers (unpaired preference); a ranking dataset "
                             "holds pairs: drop `ranking` or the kto_tag column")
        return self

    @property
    def load_from(self) -> Literal["file", "url", "hf_hub"]:
        """Where the data comes from: a local `file_name`, a `url`, or the Hugging Face hub."""
        if self.url:
            return "url"
        if self.hf_hub_url:
            return "hf_hub"
        return "file"

    def to_entry(self) -> dict:
        """The entry as written in a dataset_info.json (without the name, defaults left out)."""
        return self.model_dump(exclude={"name"}, exclude_defaults=True)


def load_dataset_info(path: Path, names: list[str], *, allow_outside: bool = False) -> dict[str, DatasetSpec]:
    """Read the entries `names` of a dataset_info.json, validated, in the order asked for.

    A `file_name` leading outside the file's directory fails unless `allow_outside` (data.allow_outside_paths).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"dataset description {path} does not exist") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected an object of dataset name -> description, got {type(info).__name__}")
    unknown = [n for n in names if n not in info]
    if unknown:
        raise DataError(
            f"dataset {', '.join(repr(n) for n in unknown)} not in {path}; known: {', '.join(sorted(info)) or '(none)'}"
        )
    specs = {}
    for name in names:
        entry = info[name]
        if not isinstance(entry, dict):
            raise DataError(f"{path}: dataset '{name}': expected an object, got {type(entry).__name__}")
        try:
            specs[name] = DatasetSpec.model_validate({**entry, "name": name})
        except ValidationError as e:
            problems = "; ".join(
                f"field '{'.'.join(str(p) for p in err['loc']) or '(entry)'}': {err['msg']}" for err in e.errors()
            )
            raise DataError(f"{path}: dataset '{name}': {problems}") from None
        if specs[name].file_name and not allow_outside:
            _refuse_outside(specs[name], path, path.parent / specs[name].file_name)
    return specs


def local_files(spec: DatasetSpec, info_path: Path, *, allow_outside: bool = False) -> list[Path]:
    """The files of a `file_name` source: the file itself, or a directory's files in sorted order (hidden
    ones skipped). Each must resolve inside the dataset_info.json's directory unless `allow_outside`:
    a directory may hold a symlink that leads out. A source that does not exist gives []."""
    root = Path(info_path).parent / spec.file_name
    if root.is_dir():
        files = [p for p in sorted(root.rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    else:
        files = [root] if root.exists() else []
    if not allow_outside:
        for f in files:
            _refuse_outside(spec, Path(info_path), f)
    return files


def _refuse_outside(spec: DatasetSpec, info_path: Path, target: Path) -> None:
    # resolve() follows every symlink on the way, so a link inside that points out is caught too.
    base = info_path.parent.resolve()
    real = target.resolve()
    if not real.is_relative_to(base):
        raise DataError(
            f"{info_path}: dataset '{spec.name}': file_name '{spec.file_name}' leads outside {base} (to {real}). "
            "Move the data next to the dataset_info.json, or set data.allow_outside_paths: true to read it "
            "from there")
