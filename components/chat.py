"""Load any model lmforge knows about and stream chat replies from it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

from components.config import PipelineConfig
from components.models.loading import load_model, load_tokenizer, load_with_adapters, resolve_base, select_hardware


def resolve_chat_model(spec: str, cfg: PipelineConfig) -> tuple[str, list[str]]:
    """Return (model source, adapters to merge) for a stage dir, a model dir, a .gguf file, a registry spec (with
    a variant: `models:/NAME@champion/nf4`, see components.serving.resolve) or a base name."""
    if spec.startswith("models:/"):
        from components.serving.resolve import resolve_registry_model

        return resolve_registry_model(spec, cfg).source, []
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"{spec}: no such GGUF file")
        return str(path.resolve()), []
    manifest = path / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if "adapter_stack" in m.get("info", {}):
            return m["info"]["base_source"], m["info"]["adapter_stack"]
        if (path / "merged" / "config.json").is_file():
            return str(path / "merged"), []
        raise ValueError(f"{path} is a {m['stage']} stage output, not a model; give a cpt, sft or quantize dir")
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return resolve_base(base), [str(path)]
    return resolve_base(spec), []


def load_chat_model(spec: str, cfg: PipelineConfig):
    """(model, tokenizer) for MODEL as `resolve_chat_model` takes it. A GGUF file is loaded by transformers,
    its weights dequantized to float (the rounding of Q8_0/Q4_0 stays; `lmforge serve` runs it in llama.cpp);
    a bitsandbytes variant (nf4, int8) loads quantized from its saved config."""
    source, adapters = resolve_chat_model(spec, cfg)
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
    if source.endswith(".gguf"):
        from components.quantization.gguf_export import load_gguf_model

        return load_gguf_model(Path(source), hardware)
    kwargs = dict(trust_remote_code=cfg.model.trust_remote_code)
    model = load_with_adapters(source, adapters, hardware, **kwargs) if adapters else load_model(source, hardware, **kwargs)
    return model.eval(), load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)


def stream_reply(model, tokenizer, history: list[dict], cfg: PipelineConfig, *, max_new_tokens: int = 256) -> Iterator[str]:
    """Yield the reply text piece by piece as the model generates it (greedy)."""
    from transformers import TextIteratorStreamer

    from components.data.chat_render import render_prompt

    prompt = render_prompt(tokenizer, cfg.tokenize.template, history, cfg.tokenize.system_prompt)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    worker = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
