"""Load any model lmforge knows about and stream chat replies from it."""

from __future__ import annotations

import json
import queue
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


def stream_reply(model, tokenizer, history: list[dict], cfg: PipelineConfig, *, max_new_tokens: int = 256,
                 prompt_lookup: int = 0, draft=None) -> Iterator[str]:
    """Yield the reply text piece by piece as the model generates it (greedy), stopping at the template's end
    of turn: through the one generation path (components.models.generation.decode, with prompt-lookup
    decoding when `prompt_lookup` > 0), or with a `draft` model through transformers' assisted generation."""
    from components.data.chat_render import render_prompt
    from components.models.generation import stop_ids

    prompt = render_prompt(tokenizer, cfg.tokenize.template, history, cfg.tokenize.system_prompt)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    stop = stop_ids(tokenizer, cfg.tokenize.template)
    if draft is not None:
        yield from _assisted_reply(model, draft, tokenizer, ids, stop, max_new_tokens)
        return
    from components.models.generation import decode

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    tokens: queue.Queue = queue.Queue()

    def run():
        try:
            decode(model, [ids], max_new_tokens=max_new_tokens, stop=stop, pad_id=pad_id, lookahead=prompt_lookup,
                   on_tokens=lambda _, new: tokens.put(new))
        except BaseException as exc:  # noqa: BLE001 - raised again in the reader below
            tokens.put(exc)
        finally:
            tokens.put(None)

    threading.Thread(target=run, daemon=True, name="chat-decode").start()
    yield from _text_pieces(tokenizer, iter(tokens.get, None))


def _text_pieces(tokenizer, batches: Iterator[list[int] | BaseException]) -> Iterator[str]:
    """The text of token ids as they come, a piece per batch of ids; special tokens (the stop token) left out.
    The whole answer is decoded each time (a token alone can be half a character or lose its leading
    space), and a piece that ends inside a character waits for the next ids."""
    ids: list[int] = []
    shown = ""
    for batch in batches:
        if isinstance(batch, BaseException):
            raise batch
        ids += batch
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
        shown = text


def load_draft_model(spec: str, cfg: PipelineConfig, tokenizer):
    """The draft model of speculative decoding (`lmforge chat --draft-model`), loaded as MODEL specs are, with
    its tokenizer; a draft that tokenizes differently is used through transformers' universal assisted
    decoding (its tokenizer given beside the target's)."""
    draft, draft_tokenizer = load_chat_model(spec, cfg)
    same = draft_tokenizer.get_vocab() == tokenizer.get_vocab()
    return draft, (None if same else draft_tokenizer)


def _assisted_reply(model, draft, tokenizer, ids: list[int], stop: list[int], max_new_tokens: int) -> Iterator[str]:
    """Greedy reply by transformers' assisted generation: `draft` (a (model, tokenizer or None) pair from
    load_draft_model) proposes tokens, the target checks them; the reply is the target's greedy one."""
    import torch
    from transformers import TextIteratorStreamer

    draft_model, draft_tokenizer = draft
    device = next(model.parameters()).device
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                  dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                  assistant_model=draft_model, eos_token_id=stop,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0])
    if draft_tokenizer is not None:
        kwargs.update(tokenizer=tokenizer, assistant_tokenizer=draft_tokenizer)
    failure: list[BaseException] = []

    def run():
        try:
            model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - raised again below
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True, name="chat-assisted")
    worker.start()
    yield from streamer
    worker.join()
    if failure:
        raise failure[0]
