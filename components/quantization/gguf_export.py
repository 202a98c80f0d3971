"""Export a merged Llama-family checkpoint to GGUF (F16, Q8_0, Q4_0) for llama.cpp and Ollama, with the `gguf`
package alone: no llama.cpp checkout, no compiler.

What llama.cpp needs, following the design of its `convert_hf_to_gguf.py` for Llama:
- tensors renamed to GGUF's (`blk.N.attn_q.weight`, ...) through the `gguf` package's own name map;
- Q and K rows reordered per head: Hugging Face's rotary embedding rotates the two halves of each head
  (`rotate_half`), GGML's Llama rope rotates adjacent pairs, so each head's halves are interleaved;
- the byte-level BPE tokenizer (tokens, merges, token types, special ids, the pre-tokenizer name llama.cpp
  selects its split regex by) and the chat template;
- the hyper-parameters llama.cpp reads (`llama.context_length`, ...).
Norms stay F32 (llama.cpp does the same); Q4_0 keeps the output matrix (the token embedding when tied) at
Q8_0, as `llama-quantize` keeps it above the rest (it uses Q6_K, which the `gguf` package cannot write).

The chat template stored in the file and the Ollama `Modelfile` written beside it (the chat format as a Go
template, the system prompt, the stop token) both prompt the way training did, system prompt included.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

from components.artifacts import atomic_write_text

log = logging.getLogger(__name__)

GGUFType = Literal["f16", "q8_0", "q4_0"]

# Hugging Face architecture -> the gguf package's architecture. Others have their own tensor layouts and keys.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}

# The pre-tokenizer llama.cpp must run (`tokenizer.ggml.pre`), by the shape of tokenizer.json's pre_tokenizer:
# llama.cpp picks its split regex by this name, so it must say what the Hugging Face tokenizer does.
PRE_TOKENIZERS = {
    # GPT-2's split regex (transformers writes this for SmolLM2 converted from its GGUF; SmolLM2's vocabulary has
    # no merge across digits, so it tokenizes exactly as its own digit-splitting 'smollm' pre-tokenizer does).
    "gpt-2": [{"type": "ByteLevel", "use_regex": True}],
    # Each digit alone, then GPT-2's regex: SmolLM/StarCoder-style tokenizers as published on the Hub.
    "smollm": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}],
}


class GGUFExportError(ValueError):
    """The checkpoint cannot be written as GGUF; the message says why and what is supported."""


def _tensor_types():
    import gguf

    Q = gguf.GGMLQuantizationType
    return {  # file type, type of 2-D weights, type of the output matrix
        "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16, Q.F16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0, Q.Q8_0),
        "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, Q.Q8_0),
    }


def rope_interleave(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder a Q or K projection's output rows from Hugging Face's half-split rotary layout to GGML's
    adjacent-pair layout: within each head, row i of the first half and row i of the second become 2i and 2i+1."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_architecture(config: dict) -> str:
    """The gguf architecture name for a Hugging Face config, or an error naming the supported ones."""
    archs = config.get("architectures") or []
    supported = ", ".join(f"{hf} (model_type {arch})" for hf, arch in SUPPORTED_ARCHITECTURES.items())
    for hf in archs:
        if hf in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[hf]
    raise GGUFExportError(
        f"GGUF export supports {supported}; this checkpoint is {archs or config.get('model_type')!r}. "
        "Set quantize.gguf: [] for it, or convert it with llama.cpp's convert_hf_to_gguf.py."
    )


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _write_rope_scaling(writer, config: dict) -> None:
    import gguf

    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return
    raise GGUFExportError(f"GGUF export writes RoPE scaling 'linear' (or none); this checkpoint uses {kind!r}")


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for name, shape in PRE_TOKENIZERS.items():
        if len(steps) == len(shape) and all(all(step.get(k) == v for k, v in want.items())
                                            for step, want in zip(steps, shape)):
            return name
    raise GGUFExportError(
        f"GGUF export knows the pre-tokenizers {', '.join(PRE_TOKENIZERS)}; tokenizer.json has "
        f"{json.dumps(pre)[:300]}. llama.cpp would split text differently from the model's own tokenizer."
    )


def _tokenizer_spec(model_dir: Path) -> dict:
    """tokenizer.json, checked to be a byte-level BPE with a pre-tokenizer llama.cpp knows."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers; {path} has a {model.get('type')} model"
                              + (" with byte fallback (sentencepiece-style)" if model.get("byte_fallback") else ""))
    _pre_tokenizer_name(spec)
    return spec


def check_exportable(model_dir: Path) -> None:
    """Fail now, naming what is unsupported, if `model_dir` cannot be exported (architecture, tokenizer): the
    quantize stage calls it before its slow scoring."""
    model_dir = Path(model_dir)
    check_architecture(json.loads((model_dir / "config.json").read_text()))
    _tokenizer_spec(model_dir)


def _write_tokenizer(writer, model_dir: Path, vocab_size: int, chat_template: str | None) -> None:
    import gguf
    from transformers import AutoTokenizer

    spec = _tokenizer_spec(model_dir)
    model = spec["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses (vocab padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id")
        if token_id is not None:
            add(int(token_id))
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]))
    byte_level = [s for s in ([spec["pre_tokenizer"]] + spec["pre_tokenizer"].get("pretokenizers", []))
                  if s.get("type") == "ByteLevel"]
    writer.add_add_space_prefix(bool(byte_level and byte_level[0].get("add_prefix_space")))
    template = chat_template or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        writer.add_chat_template(template)


def _weights(model_dir: Path):
    """(name, float32 array) for every tensor of the checkpoint, one at a time (only the converted ones are kept)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir} has no .safetensors weights (the quantize stage's merged/ has)")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def export_gguf(model_dir: Path, out_path: Path, kind: GGUFType, *, name: str | None = None,
                chat_template: str | None = None) -> Path:
    """Write the checkpoint in `model_dir` (safetensors + tokenizer) as one GGUF file of type `kind`, with
    `chat_template` (Jinja; default the tokenizer's own) as the template llama.cpp applies."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    arch = check_architecture(config)
    _tokenizer_spec(model_dir)  # refused before minutes of quantizing, not after
    types = _tensor_types()
    if kind not in types:
        raise GGUFExportError(f"unknown GGUF type {kind!r}; supported: {', '.join(types)}")
    file_type, weight_type, output_type = types[kind]
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hidden, n_layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // n_head
    vocab_size = config["vocab_size"]

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tied = config.get("tie_word_embeddings", False)
    tensors = []
    for hf_name, data in _weights(model_dir):
        if tied and hf_name == "lm_head.weight":
            continue  # the token embedding serves as the output matrix
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"{model_dir}: no GGUF name for tensor {hf_name!r} of a {arch} model")
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = rope_interleave(data, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = rope_interleave(data, n_kv)
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        qtype = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else (output_type if is_output else weight_type)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.shape[-1] % block:  # rows must be whole blocks; llama.cpp falls back the same way
            log.info("%s: rows of %d are not whole %s blocks, written as F16", gguf_name, data.shape[-1], qtype.name)
            qtype = gguf.GGMLQuantizationType.F16
        tensors.append((gguf_name, gguf.quants.quantize(data, qtype), qtype))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")  # renamed when whole: a crash never leaves a partial file
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(hidden)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        _write_rope_scaling(writer, config)
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_vocab_size(vocab_size)
        _write_tokenizer(writer, model_dir, vocab_size, chat_template)
        for gguf_name, data, qtype in tensors:
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _render(tokenizer, template: str, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def matching_format(tokenizer, template: str):
    """(name, ChatFormat) of the table format that renders like `template` (the model's own Jinja, which Ollama
    cannot run), or None. Only formats with a system turn: Ollama's `.System` maps onto it."""
    from components.data.templates import FORMATS, TEMPLATES

    probe = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    rendered = _render(tokenizer, template, probe)
    for name, fmt in FORMATS.items():
        if fmt.system is not None and _render(tokenizer, TEMPLATES[name], probe) == rendered:
            return name, fmt
    return None


def default_system_prompt(tokenizer, template: str, format_name: str) -> str | None:
    """The system prompt `template` (which renders like the table's `format_name`) inserts when a conversation
    has none, as SmolLM2's does; else None."""
    from components.data.templates import FORMATS, TEMPLATES

    user = [{"role": "user", "content": "U1"}]
    own, plain = _render(tokenizer, template, user), _render(tokenizer, TEMPLATES[format_name], user)
    prefix = own[: -len(plain)] if own.endswith(plain) else ""
    s0, s1 = FORMATS[format_name].system
    if prefix.startswith(s0) and prefix.endswith(s1) and len(prefix) > len(s0) + len(s1):
        return prefix[len(s0) : len(prefix) - len(s1)]
    return None


def go_template(fmt, eos: str, *, always_system: bool) -> str:
    """A chat format as an Ollama (Go text/template) TEMPLATE: the system turn from `.System`, then each message,
    then the generation prompt. `always_system`: write the system turn even when `.System` is empty, for a model
    that always saw one (an empty one included). BOS is not written: llama.cpp adds it where the GGUF says
    add_bos_token."""

    def text(piece: str) -> str:
        return piece.replace("{eos}", eos).replace("{bos}", "")

    (s0, s1), (u0, u1), (a0, a1), (t0, t1) = (tuple(map(text, p)) for p in (fmt.system, fmt.user, fmt.assistant, fmt.tool))
    system = f"{s0}{{{{ .System }}}}{s1}"
    return (
        (system if always_system else f"{{{{ if .System }}}}{system}{{{{ end }}}}")
        + "{{ range .Messages }}"
        + f'{{{{ if eq .Role "user" }}}}{u0}{{{{ .Content }}}}{u1}'
        + f'{{{{ else if eq .Role "assistant" }}}}{a0}{text(fmt.answer_lead)}{{{{ .Content }}}}{a1}'
        + f'{{{{ else if eq .Role "tool" }}}}{t0}{{{{ .Content }}}}{t1}'
        + f"{{{{ end }}}}{{{{ end }}}}{a0}"
    )


def ollama_modelfile(gguf_name: str, tokenizer, template: str, system_prompt: str | None) -> str:
    """An Ollama Modelfile for `gguf_name` beside it: the chat format as a Go template, the system prompt the model
    was trained with (`system_prompt`, else the template's own default), and the end of turn as the stop.

    `template` is what tokenize.template names ('auto', a table name or Jinja). A template that matches no format
    of the table gets no TEMPLATE: Ollama then falls back to the chat template stored in the GGUF."""
    from components.data.chat_render import prepare_template
    from components.data.templates import stop_string

    chat = prepare_template(tokenizer, template)
    stop = stop_string(tokenizer, "auto" if chat.name == "custom" else chat.name)
    lines = [f"FROM ./{gguf_name}"]
    found = matching_format(tokenizer, chat.source)
    if found is None:
        log.warning("chat template matches no format with a system turn in the table: the Modelfile has no "
                    "TEMPLATE, Ollama will use the template stored in the GGUF")
    else:
        name, fmt = found
        system = system_prompt if system_prompt is not None else default_system_prompt(tokenizer, chat.source, name)
        # Trained with a system turn on every row (the configured one, even empty, or the template's default).
        template = go_template(fmt, tokenizer.eos_token or "", always_system=system is not None)
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def with_trained_system_prompt(template: str, system_prompt: str | None) -> str:
    """`template` with the system prompt the model was trained with (`tokenize.system_prompt`) inserted where a
    conversation has none, as training did (chat_render.with_system_prompt): llama.cpp then prompts as training
    did, rather than with the template's own default. None: the template as it is."""
    if system_prompt is None:
        return template
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': " + json.dumps(system_prompt) + "}] + messages -%}"
            "{%- endif -%}" + template)


def export_gguf_variant(model_dir: Path, out_dir: Path, kind: GGUFType, *, template: str, system_prompt: str | None,
                        name: str | None = None) -> list[Path]:
    """`out_dir/model-<kind>.gguf` and its Ollama `Modelfile`, both with the chat template the model was trained
    with (`template` as tokenize.template names it); returns both paths."""
    from transformers import AutoTokenizer

    from components.data.chat_render import prepare_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat_template = with_trained_system_prompt(prepare_template(tokenizer, template).source, system_prompt)
    gguf_path = export_gguf(model_dir, Path(out_dir) / f"model-{kind}.gguf", kind, name=name,
                            chat_template=chat_template)
    modelfile = Path(out_dir) / "Modelfile"
    atomic_write_text(modelfile, ollama_modelfile(gguf_path.name, tokenizer, template, system_prompt))
    return [gguf_path, modelfile]


def load_gguf_model(gguf_path: Path, hardware):
    """(model, tokenizer) of a GGUF file through transformers (`gguf_file=`): the weights dequantized to
    `hardware`'s dtype, so a Q8_0/Q4_0 file keeps its rounding but not llama.cpp's quantized matmuls."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=hardware.dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(hardware.device).eval(), tokenizer
