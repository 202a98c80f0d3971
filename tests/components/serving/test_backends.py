"""Backend choice and the commands lmforge hands over to (vLLM and llama.cpp are not installed here: their
commands are checked as built, and a missing one is a clear error naming what to install)."""

from __future__ import annotations

import json
import sys

import pytest

from components.serving import backends
from components.serving.backends import BackendError, choose_backend, llamacpp_command, transformers_command, vllm_command


def test_transformers_is_the_default_and_batches_concurrent_requests(monkeypatch):
    monkeypatch.setattr(backends, "importable", lambda m: m == "openai")
    assert choose_backend("auto", is_gguf=False) == "transformers"
    monkeypatch.setattr(backends, "importable", lambda m: False)
    with pytest.raises(BackendError, match=r"pip install -e '.\[serve\]'"):
        choose_backend("transformers", is_gguf=False)
    cmd = transformers_command("/models/coder", 4321)
    assert cmd.argv[:5] == [sys.executable, "-m", "transformers.cli.transformers", "serve", "/models/coder"]
    assert "--continuous-batching" in cmd.argv and cmd.argv[cmd.argv.index("--host") + 1] == "127.0.0.1"
    assert cmd.upstream_model == "/models/coder"  # transformers serve wants the path as `model`
    assert transformers_command("/m", 1, extra=("--quantization", "bnb-4bit")).argv[-2:] == ["--quantization",
                                                                                            "bnb-4bit"]


def test_on_cpu_the_paged_cache_blocks_are_small_enough_to_share_a_template_prefix(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    argv = transformers_command("/m", 1).argv
    assert argv[argv.index("--cb-block-size") + 1] == str(backends.CPU_CB_BLOCK_SIZE)
    assert transformers_command("/m", 1, extra=("--cb-block-size", "32")).argv.count("--cb-block-size") == 1
    assert "--cb-block-size" not in transformers_command("/m", 1, continuous_batching=False).argv
    monkeypatch.setattr(backends, "cuda_available", lambda: True)  # the GPU kernels' own default stands
    assert "--cb-block-size" not in transformers_command("/m", 1).argv


def _llama_config(tmp_path, **overrides):
    config = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "num_hidden_layers": 30,
              "vocab_size": 49152, "dtype": "float32", **overrides}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_on_cpu_the_kv_cache_is_sized_for_the_model_not_for_the_machines_ram(monkeypatch, tmp_path):
    """transformers sizes a CPU cache from 80% of free RAM (13.1 GB for the 135M demo model): lmforge passes a
    token budget instead, smaller for a model whose cache per token is large, and a step's token limit."""
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    small = _llama_config(tmp_path)  # SmolLM2-135M: 30 layers x 2 x 3 heads x 64 x 4 bytes = 46 KB a token
    assert backends.kv_bytes_per_token(small) == 46080
    argv = transformers_command(small, 1).argv
    blocks = int(argv[argv.index("--cb-num-blocks") + 1])
    assert blocks * backends.CPU_CB_BLOCK_SIZE == backends.CPU_KV_CACHE_TOKENS
    assert argv[argv.index("--cb-max-batch-tokens") + 1] == str(backends.CPU_MAX_BATCH_TOKENS)

    big = tmp_path / "big"
    big.mkdir()  # a 7B-like cache: 32 layers x 2 x 32 heads x 128 x 2 bytes = 512 KB a token
    big_dir = _llama_config(big, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                            num_hidden_layers=32, dtype="bfloat16")
    argv = transformers_command(big_dir, 1).argv
    tokens = int(argv[argv.index("--cb-num-blocks") + 1]) * backends.CPU_CB_BLOCK_SIZE
    assert tokens * backends.kv_bytes_per_token(big_dir) <= backends.CPU_KV_CACHE_BYTES
    assert tokens == backends.CPU_KV_CACHE_BYTES // (512 * 1024)

    # The user's own settings win; the block count follows their block size.
    argv = transformers_command(small, 1, extra=("--cb-block-size=32",)).argv
    assert int(argv[argv.index("--cb-num-blocks") + 1]) * 32 == backends.CPU_KV_CACHE_TOKENS
    for given in (("--cb-num-blocks", "99"), ("--cb-max-memory-percent", "0.2")):
        argv = transformers_command(small, 1, extra=given).argv
        assert argv.count("--cb-num-blocks") == (given[0] == "--cb-num-blocks")
    assert transformers_command(small, 1, extra=("--cb-max-batch-tokens", "64")).argv.count("--cb-max-batch-tokens") == 1
    # No config.json to read: the token budget as it stands.
    argv = transformers_command(str(tmp_path / "missing"), 1).argv
    assert int(argv[argv.index("--cb-num-blocks") + 1]) * backends.CPU_CB_BLOCK_SIZE == backends.CPU_KV_CACHE_TOKENS
    monkeypatch.setattr(backends, "cuda_available", lambda: True)  # a GPU: transformers' own sizing
    assert "--cb-num-blocks" not in transformers_command(small, 1).argv


def test_a_gguf_without_llama_cpp_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backends, "importable", lambda m: False)
    with pytest.raises(BackendError, match="pip install 'llama-cpp-python"):
        choose_backend("auto", is_gguf=True)
    with pytest.raises(BackendError, match="--backend llamacpp"):
        choose_backend("transformers", is_gguf=True)
    monkeypatch.setattr(backends, "importable", lambda m: m == "llama_cpp")
    assert choose_backend("auto", is_gguf=True) == "llamacpp"
    cmd = llamacpp_command("/m/model.Q4_0.gguf", 9000)
    assert cmd.argv[1:3] == ["-m", "llama_cpp.server"] and cmd.argv[cmd.argv.index("--model") + 1] == "/m/model.Q4_0.gguf"


def test_vllm_only_where_it_is_installed_and_a_gpu_is(monkeypatch):
    monkeypatch.setattr(backends, "importable", lambda m: m in ("vllm", "openai"))
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert choose_backend("auto", is_gguf=False) == "transformers"
    with pytest.raises(BackendError, match="CUDA GPU"):
        choose_backend("vllm", is_gguf=False)
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    assert choose_backend("auto", is_gguf=False) == "vllm"
    monkeypatch.setattr(backends, "importable", lambda m: m == "openai")
    with pytest.raises(BackendError, match="pip install vllm"):
        choose_backend("vllm", is_gguf=False)
    with pytest.raises(BackendError, match="choose one of"):
        choose_backend("tgi", is_gguf=False)


def test_vllm_serves_one_lora_adapter_as_a_lora_module():
    cmd = vllm_command("/base", 8100, adapters=("/runs/sft/adapter",), served_name="coder@champion")
    assert cmd.argv[:3] == ["vllm", "serve", "/base"]
    assert cmd.argv[cmd.argv.index("--lora-modules") + 1] == "coder@champion-lora=/runs/sft/adapter"
    assert "--enable-lora" in cmd.argv and cmd.upstream_model == "coder@champion-lora"
    plain = vllm_command("/merged", 8100, served_name="coder")
    assert "--enable-lora" not in plain.argv and plain.upstream_model == "coder"
    with pytest.raises(BackendError, match="merge"):
        vllm_command("/base", 8100, adapters=("/a", "/b"))


def test_a_greedy_model_is_served_through_a_view_that_samples_per_request(tmp_path):
    import json

    from components.serving.backends import NO_TOP_K, sampling_view

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    view, defaults = sampling_view(model, tmp_path / "views")
    assert defaults == {"temperature": 0.0, "top_p": 1.0, "top_k": NO_TOP_K}  # omitted: greedy, as saved
    assert (view / "config.json").resolve() == (model / "config.json").resolve()
    served = json.loads((view / "generation_config.json").read_text())
    assert served["do_sample"] and served["eos_token_id"] == 2 and served["temperature"] not in (None, 1.0)
    assert json.loads((model / "generation_config.json").read_text()) == {"eos_token_id": 2}  # the model untouched
    assert sampling_view(model, tmp_path / "views")[0] == view  # made once

    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    view2, defaults = sampling_view(model, tmp_path / "views")
    assert view2 != view and defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": NO_TOP_K}


def test_speculative_decoding_is_handed_to_the_backends_that_have_it():
    import json

    from components.serving.backends import speculation_arguments

    assert speculation_arguments("transformers") == ()  # off by default, whatever the backend
    ngram = speculation_arguments("vllm", prompt_lookup=5)
    assert ngram[0] == "--speculative-config"
    assert json.loads(ngram[1]) == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}
    draft = json.loads(speculation_arguments("vllm", draft_model="/models/small")[1])
    assert draft["method"] == "draft_model" and draft["model"] == "/models/small" and draft["num_speculative_tokens"] > 0
    cmd = vllm_command("/merged", 8100, extra=ngram)
    assert cmd.argv[-2:] == list(ngram)
    assert speculation_arguments("llamacpp", prompt_lookup=8) == (
        "--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", "8")
    with pytest.raises(BackendError, match="prompt lookup only"):
        speculation_arguments("llamacpp", draft_model="/models/small.gguf")
    with pytest.raises(BackendError, match="lmforge chat --prompt-lookup"):
        speculation_arguments("transformers", prompt_lookup=4)
    with pytest.raises(BackendError, match="choose one"):
        speculation_arguments("vllm", prompt_lookup=4, draft_model="/models/small")
