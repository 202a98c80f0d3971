"""Evaluate a model on the held-out sets: perplexity by likelihood, answers by greedy generation.

Perplexity uses the training loss on length-sorted, causally padded batches (labeled tokens only).
Generation batches prompts with left padding: on a CPU one prompt at a time costs nearly as much per
token as sixteen.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from components.artifacts import StageResult, atomic_write_json
from components.config import EvaluateConfig
from components.data.align import iter_records
from components.data.packing import pad_causal
from components.data.chat_render import render_prompt
from components.data.templates import resolve_template
from components.data.tokenize import load_tokenized
from components.evaluation.metrics import text_metrics
from components.models.loading import load_tokenizer, load_with_adapters, select_hardware
from components.models.loss import labeled_positions_loss

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.pipeline import StageInputs

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model, rows: list[dict], pad_token_id: int, batch_size: int = 16) -> float:
    """exp(mean NLL) over the labeled tokens of `rows` (dicts with input_ids, labels[, position_ids])."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]))
    for i in range(0, len(ordered), batch_size):
        batch = pad_causal(ordered[i : i + batch_size], pad_token_id)
        batch.pop("num_real_tokens")
        tensors = {k: v.to(device) for k, v in batch.items()}
        loss, n = labeled_positions_loss(model, tensors, reduction="sum")
        total += float(loss)
        count += n
    return math.exp(total / count) if count else float("nan")


def split_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """A held-out conversation becomes (prompt messages, reference answer = last assistant turn)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("held-out conversation must end with an assistant turn")
    return messages[:-1], messages[-1]["content"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for rendered prompts, batched with left padding."""
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate_model(
    model,
    tokenizer,
    *,
    tokenized_dir: Path,
    aligned_dir: Path,
    cfg: EvaluateConfig,
    template_name: str,
    system_prompt: str | None,
    max_samples: int | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Score one loaded model; returns (metrics, samples)."""
    metrics: dict[str, float] = {}
    n_ppl = min(cfg.perplexity_max_samples, max_samples or cfg.perplexity_max_samples)
    for group in ("cpt_eval", "sft_eval"):
        path = Path(tokenized_dir) / f"{group}.parquet"
        if path.is_file():
            ds = load_tokenized(path)
            cols = [c for c in ("input_ids", "labels", "position_ids") if c in ds.column_names]
            rows = ds.select_columns(cols).select(range(min(n_ppl, len(ds)))).to_list()
            metrics[f"perplexity_{group}"] = perplexity(model, rows, tokenizer.pad_token_id)

    samples: list[dict] = []
    eval_file = Path(aligned_dir) / "sft_eval.jsonl"
    if eval_file.is_file():
        template = resolve_template(tokenizer, template_name)
        records = []
        for rec in iter_records(eval_file):
            records.append(rec)
            if len(records) >= min(cfg.max_samples, max_samples or cfg.max_samples):
                break
        pairs = [split_prompt(r["messages"]) for r in records]
        prompts = [render_prompt(tokenizer, template, m, system_prompt) for m, _ in pairs]
        refs = [ref for _, ref in pairs]
        preds = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        metrics.update(text_metrics(preds, refs))
        samples = [
            {"prompt": m[-1]["content"], "reference": r, "prediction": p} for (m, _), r, p in zip(pairs, refs, preds)
        ]
    return metrics, samples


def write_evaluation(out_dir: Path, metrics: dict, samples: list[dict], prefix: str = "") -> list[str]:
    atomic_write_json(out_dir / f"{prefix}metrics.json", metrics)
    (out_dir / f"{prefix}samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return [f"{prefix}metrics.json", f"{prefix}samples.jsonl"]


def run_evaluate(model, tokenizer, out_dir: Path, **kwargs) -> StageResult:
    metrics, samples = evaluate_model(model, tokenizer, **kwargs)
    files = write_evaluation(Path(out_dir), metrics, samples)
    log.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items()})
    return StageResult(files=files, metrics=metrics)


def evaluate_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline): the base with the adapters among the inputs merged
    in (none for evaluate-base), scored on the held-out sets."""
    base = inputs.base_model
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
    model = load_with_adapters(base.source, inputs.adapter_stack(), hardware, **base.load_kwargs())
    tokenizer = load_tokenizer(base.source, **base.load_kwargs())
    return run_evaluate(
        model, tokenizer, out_dir, tokenized_dir=inputs.dir("tokenize"), aligned_dir=inputs.dir("align"),
        cfg=cfg.evaluate, template_name=cfg.tokenize.template, system_prompt=cfg.tokenize.system_prompt,
    )
