"""A quantized variant registered with a version is served and chatted with by name: models:/NAME@alias/VARIANT
(or /VERSION/VARIANT) resolves to the variant's own files from the model run's `variants/` artifacts, a GGUF
type alone names its gguf- folder, and an unknown name is refused with the list of those that exist. Where
llama-cpp-python is installed, `lmforge serve` runs the GGUF variant in llama.cpp and answers the openai client."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from components import tracking
from components.config import EvaluateConfig, QuantizeConfig, load_config
from components.models.loading import select_hardware
from components.pipeline import BaseModelRef
from components.quantization import quantize
from components.registry import log_variants, register_model
from components.serving.resolve import (
    RegistrySpec,
    ServeSpecError,
    parse_registry_spec,
    resolve_registry_model,
    resolve_served_model,
)

NAME = "tiny-variants"


@pytest.fixture(scope="module")
def registry(tiny_model_dir, tmp_path_factory):
    """A SQLite registry holding one version (@champion) of the tiny model with the variants the quantize stage
    saved for it (NF4 and GGUF Q8_0), registered as the register stage does; returns (config, quantize dir)."""
    root = tmp_path_factory.mktemp("variants")
    out = root / "quantize"
    patch = pytest.MonkeyPatch()
    # Scoring has its own tests: a fixed score keeps this fixture at seconds.
    patch.setattr(quantize, "evaluate_model", lambda model, tokenizer, **kw: ({"exact_match": 0.5, "n": 4.0}, []))
    try:
        quantize.run_quantize(BaseModelRef(str(tiny_model_dir)), [], QuantizeConfig(methods=["nf4"], gguf=["q8_0"]),
                              EvaluateConfig(), select_hardware("cpu", "fp32"), out, tokenized_dir=root,
                              aligned_dir=root, template_name="auto", system_prompt=None)
    finally:
        patch.undo()
    cfg = load_config(None, [f"workspace={root / 'ws'}", "compute.device=cpu"])
    client = tracking.client_for(cfg.tracking_uri())
    run_id = tracking.start_run(client, tracking.experiment_id(client, "variants", root / "mlartifacts"), "model")
    tags = log_variants(client, run_id, out)
    files = sorted(p.name for p in (out / "merged").iterdir() if p.is_file())
    register_model(client, name=NAME, run_id=run_id, model_dir=out / "merged", files=files, tags=tags, alias="champion")
    tracking.end_run(client, run_id)
    return cfg, out


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_variant_specs_parse():
    assert parse_registry_spec("models:/coder@champion/nf4") == RegistrySpec("coder", "champion", None, "nf4")
    assert parse_registry_spec("models:/coder/3/gguf-q4_0") == RegistrySpec("coder", None, "3", "gguf-q4_0")
    assert parse_registry_spec("models:/coder@champion") == RegistrySpec("coder", "champion", None, None)
    for bad in ("models:/coder@champion/", "models:/coder@champion/a/b", "models:/coder/3/", "models:/coder/x/nf4",
                "models:/a/b@c"):
        with pytest.raises(ServeSpecError, match="optionally followed by /VARIANT"):
            parse_registry_spec(bad)


def test_a_gguf_variant_resolves_to_its_registered_file(registry):
    cfg, out = registry
    for spec in (f"models:/{NAME}@champion/gguf-q8_0", f"models:/{NAME}@champion/q8_0", f"models:/{NAME}/1/q8_0"):
        model = resolve_served_model(spec, cfg)
        assert model.is_gguf and model.source.endswith("model-q8_0.gguf") and model.version == "1"
        assert digest(out / "gguf-q8_0" / "model-q8_0.gguf") == digest(Path(model.source))
    assert model.name == f"{NAME}/1/gguf-q8_0" and model.info["variant"] == "gguf-q8_0"
    followed = resolve_served_model(f"models:/{NAME}@champion/q8_0", cfg)
    assert followed.name == f"{NAME}@champion/gguf-q8_0" and followed.follows == (NAME, "champion")


def test_an_nf4_variant_resolves_to_its_quantized_checkpoint(registry):
    cfg, out = registry
    model = resolve_served_model(f"models:/{NAME}@champion/nf4", cfg)
    assert not model.is_gguf and model.name == f"{NAME}@champion/nf4"
    config = json.loads((Path(model.source) / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert digest(Path(model.source) / "model.safetensors") == digest(out / "nf4" / "model.safetensors")
    merged = resolve_served_model(f"models:/{NAME}@champion/merged", cfg)
    assert merged.source == resolve_served_model(f"models:/{NAME}@champion", cfg).source
    assert "quantization_config" not in json.loads((Path(merged.source) / "config.json").read_text())


def test_an_unknown_variant_lists_those_registered(registry):
    cfg, _ = registry
    with pytest.raises(ServeSpecError) as err:
        resolve_registry_model(f"models:/{NAME}@champion/q4_0", cfg)
    assert "version 1 of tiny-variants has no variant 'q4_0'; its variants: merged, gguf-q8_0, nf4" in str(err.value)


def test_chat_loads_variants_by_name(registry, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from components.chat import load_chat_model

    cfg, _ = registry
    nf4, _ = load_chat_model(f"models:/{NAME}@champion/nf4", cfg)
    assert type(nf4.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    q8, tokenizer = load_chat_model(f"models:/{NAME}@champion/q8_0", cfg)
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer("Which ICD-10-CM chapter contains code E11.9?", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = q8(ids).logits, source(ids).logits
    assert not torch.equal(ours, theirs) and torch.allclose(ours, theirs, atol=0.05)  # Q8_0's rounding, no more
    assert tokenizer.chat_template is not None and tokenizer.pad_token is not None


LLAMA_CPP_SERVER = all(importlib.util.find_spec(m) for m in ("llama_cpp", "sse_starlette", "starlette_context"))


@pytest.mark.skipif(not LLAMA_CPP_SERVER, reason="llama.cpp's server is not importable here: pip install "
                    "'llama-cpp-python[server]' (a source build; .ci/run builds it and caches the wheel)")
def test_a_gguf_variant_is_served_by_llama_cpp(registry):
    import os
    import sys

    import httpx
    import openai

    from tests.servers import free_port, running_server

    cfg, _ = registry
    port = free_port()
    public = f"{NAME}@champion/gguf-q8_0"
    command = [sys.executable, "-m", "flows.cli", "serve", f"models:/{NAME}@champion/q8_0", "--port", str(port),
               "--follow-interval", "0", "--set", f"workspace={cfg.workspace}"]
    log_path = Path(cfg.workspace) / "serve-llamacpp.log"
    with running_server(command, dict(os.environ), f"http://127.0.0.1:{port}/health", log_path):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        [card] = client.models.list().data
        assert card.id == public and card.lmforge["backend"] == "llamacpp" and card.lmforge["version"] == "1"
        chat = [{"role": "user", "content": "Which ICD-10-CM chapter contains code E11.9?"}]
        reply = client.chat.completions.create(model=public, messages=chat, max_tokens=4, temperature=0)
        assert reply.model == public and reply.choices[0].message.role == "assistant"
        assert 0 < reply.usage.completion_tokens <= 4 and reply.usage.prompt_tokens > 10
        plain = client.completions.create(model=public, prompt="ICD-10-CM", max_tokens=6, temperature=0)
        streamed = client.completions.create(model=public, prompt="ICD-10-CM", max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text  # greedy
        raw = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                         json={"model": public, "messages": chat, "max_tokens": 3, "stream": True})
        assert [line for line in raw.text.splitlines() if line.startswith("data: ")][-1] == "data: [DONE]"

    # llama.cpp's prompt-lookup decoding (`--prompt-lookup`): the same greedy text.
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    with running_server([*command, "--prompt-lookup", "4"], dict(os.environ), f"http://127.0.0.1:{port}/health",
                        Path(cfg.workspace) / "serve-llamacpp-lookup.log"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        looked_up = client.completions.create(model=public, prompt="ICD-10-CM", max_tokens=6, temperature=0)
        assert looked_up.choices[0].text == plain.choices[0].text


def test_an_nf4_variant_is_served_by_transformers_quantized(registry):
    """`lmforge serve models:/NAME@champion/nf4` runs the registered bitsandbytes checkpoint in transformers
    serve: its greedy completion is the NF4 model's own (loaded here as chat loads it), token for token."""
    import os
    import sys

    import openai
    import torch

    from components.chat import load_chat_model
    from tests.servers import free_port, running_server

    cfg, _ = registry
    port = free_port()
    public = f"{NAME}@champion/nf4"
    command = [sys.executable, "-m", "flows.cli", "serve", f"models:/{public}", "--port", str(port),
               "--follow-interval", "0", "--set", f"workspace={cfg.workspace}", "--set", "compute.device=cpu",
               "--backend-args", "--cb-num-blocks 64 --cb-max-batch-tokens 256"]
    with running_server(command, dict(os.environ), f"http://127.0.0.1:{port}/health",
                        Path(cfg.workspace) / "serve-nf4.log"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        [card] = client.models.list().data
        assert card.id == public and card.lmforge["backend"] == "transformers"
        served = client.completions.create(model=public, prompt="ICD-10-CM code", max_tokens=6, temperature=0)
    model, tokenizer = load_chat_model(f"models:/{public}", cfg)
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    ids = tokenizer("ICD-10-CM code", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert served.usage.completion_tokens == 6
    assert served.choices[0].text == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
