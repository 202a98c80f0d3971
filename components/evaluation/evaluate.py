"""Evaluate a model on the held-out sets: perplexity by likelihood, answers by greedy generation and,
for fixed-answer tasks, by constrained choice; every figure per task with its majority baseline and 95% interval.

Perplexity uses the training loss on length-sorted, causally padded batches (labeled tokens only).
Generation batches prompts with left padding (on a CPU one prompt at a time costs nearly as much per
token as sixteen), ordered task by task: each task's rows share its question stem, and a row that has
answered (a Yes/No after a few tokens) leaves the batch.
Held-out rows are grouped by their `task` label (components/evaluation/per_task.py); optional
lm-evaluation-harness tasks run on the same model (components/evaluation/harness.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from components.artifacts import StageResult, atomic_write_json, atomic_write_text
from components.config import EvaluateConfig
from components.data.align import iter_records
from components.data.packing import pad_causal
from components.data.chat_render import render_prompt
from components.data.templates import resolve_template
from components.data.tokenize import load_tokenized
from components.data.encoding import encode_texts
from components.evaluation.choice import choose
from components.evaluation.divergence import answer_kl, kl_metrics
from components.evaluation.intervals import proportion
from components.evaluation.metrics import normalize_answer, text_scores
from components.evaluation.per_task import (
    answer_set,
    finite_values as _finite_dict,
    flatten_report,
    group_by_task,
    majority_rate,
    task_entry,
)
from components.models.generation import completion_text, decode, stop_ids
from components.models.loading import load_for_inference, load_tokenizer, select_hardware
from components.models.loss import labeled_positions_loss
from components.pipeline import HELDOUT_READS
from components.runtime import progress

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

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


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, template: str = "auto",
             reference=None, groups: list | None = None,
             lookahead: int = 0) -> list[str] | tuple[list[str], list[list[float]]]:
    """Greedy answers for rendered prompts, through the one generation path (components.models.generation),
    stopping at the template's end of turn. Give prompts of a kind together, labelled by `groups` (a task
    each): a batch may hold several kinds, and each kind's rows share their common prefix.
    With a `reference` model, also each answer's per-position KL(model || reference); `lookahead` > 0 decodes
    by prompt lookup (the same greedy answers, see generation.lookahead_steps)."""
    encoded = encode_texts(tokenizer, prompts)
    stop = stop_ids(tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions = []
    for i in progress(range(0, len(prompts), batch_size), desc="generate", leave=False):
        completions += decode(model, encoded[i : i + batch_size], max_new_tokens=max_new_tokens, stop=stop,
                              pad_id=pad_id, batch_size=batch_size, reference=reference, lookahead=lookahead,
                              groups=groups[i : i + batch_size] if groups is not None else None)
    answers = [completion_text(tokenizer, c) for c in completions]
    return answers if reference is None else (answers, [c.kl for c in completions])


@dataclass
class Evaluation:
    """What scoring one model gives: flat metrics (MLflow), sample answers, and the per-task report."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    per_task: dict = field(default_factory=dict)


def _perplexities(model, tokenizer, tokenized_dir: Path, n: int) -> dict[str, float]:
    out = {}
    for group in ("cpt_eval", "sft_eval"):
        path = Path(tokenized_dir) / f"{group}.parquet"
        if path.is_file():
            ds = load_tokenized(path)
            cols = [c for c in ("input_ids", "labels", "position_ids") if c in ds.column_names]
            rows = ds.select_columns(cols).select(range(min(n, len(ds)))).to_list()
            out[f"perplexity_{group}"] = perplexity(model, rows, tokenizer.pad_token_id)
    return out


def _answers_by_task(model, tokenizer, tasks: list[str], prompts: list[str], *, cfg: EvaluateConfig,
                     template_name: str, reference=None) -> tuple[list[str], list[list[float]] | None]:
    """Greedy answers to `prompts` (and, with a `reference`, each answer's per-position KL to it), in their
    order. Ordered task by task, shortest prompts first within a task, and decoded `cfg.batch_size` at a
    time: each task's rows in a batch share the task's question stem, and a batch may hold every task
    (one batch of many rows costs less per token than several small ones)."""
    rank = {task: n for n, task in enumerate(dict.fromkeys(tasks))}
    order = sorted(range(len(prompts)), key=lambda i: (rank[tasks[i]], len(prompts[i])))
    out = generate(model, tokenizer, [prompts[i] for i in order], max_new_tokens=cfg.max_new_tokens,
                   batch_size=cfg.batch_size, template=template_name, reference=reference,
                   groups=[tasks[i] for i in order], lookahead=cfg.prompt_lookup)
    out, out_kls = out if reference is not None else (out, None)
    answers, kls = [""] * len(prompts), ([[] for _ in prompts] if reference is not None else None)
    for k, i in enumerate(order):
        answers[i] = out[k]
        if kls is not None:
            kls[i] = out_kls[k]
    return answers, kls


def score_heldout(
    model,
    tokenizer,
    records: list[dict],
    *,
    cfg: EvaluateConfig,
    template_name: str,
    system_prompt: str | None,
    max_samples: int | None = None,
    phases: PhaseTimer | None = None,
    reference=None,
) -> tuple[dict, list[dict]]:
    """The per-task report (see components/evaluation/per_task.py) and the sample answers for held-out
    conversation records. Each task keeps its first `cfg.max_samples` rows; `max_samples` caps the total,
    split evenly over the tasks. A task's candidate answers come from all its rows. With a `reference`
    model, each sample also gets `kl_to_sft`: its answer's KL to the reference (components.evaluation.divergence)."""
    all_rows = group_by_task(records)
    if cfg.tasks:
        unknown = sorted(set(cfg.tasks) - set(all_rows))
        if unknown:
            raise ValueError(f"evaluate.tasks names {unknown}, which no held-out row carries; the held-out tasks "
                             f"are {sorted(all_rows)}. Fix evaluate.tasks in the config.")
        all_rows = {task: rows for task, rows in all_rows.items() if task in cfg.tasks}
    cap = cfg.max_samples
    if max_samples is not None and all_rows:
        cap = min(cap, max(1, math.ceil(max_samples / len(all_rows))))
    groups = {task: rows[:cap] for task, rows in all_rows.items()}
    template = resolve_template(tokenizer, template_name)

    rows = [(task, rec) for task, recs in groups.items() for rec in recs]
    pairs = [split_prompt(rec["messages"]) for _, rec in rows]
    prompts = [render_prompt(tokenizer, template, m, system_prompt) for m, _ in pairs]
    phase = phases or (lambda _: nullcontext())
    with phase("generate"):
        preds, kls = _answers_by_task(model, tokenizer, [task for task, _ in rows], prompts, cfg=cfg,
                                      template_name=template_name, reference=reference)
    refs = [ref for _, ref in pairs]

    picks: list[str | None] = [None] * len(rows)
    tasks: dict[str, dict] = {}
    start = 0
    for task, recs in groups.items():
        span = range(start, start + len(recs))
        start += len(recs)
        task_refs = [refs[i] for i in span]
        scores = text_scores([preds[i] for i in span], task_refs, resamples=cfg.bootstrap_resamples)
        candidates = None
        if cfg.choice_max_answers:
            candidates = answer_set([split_prompt(r["messages"])[1] for r in all_rows[task]], cfg.choice_max_answers)
        if candidates:
            with phase("choice"):
                chosen, _ = choose(tokenizer, model, template_name, [pairs[i][0] for i in span], candidates,
                                   system_prompt=system_prompt, batch_size=cfg.batch_size)
            for i, pick in zip(span, chosen):
                picks[i] = pick
            scores["choice_accuracy"] = proportion(
                [normalize_answer(p) == normalize_answer(r) for p, r in zip(chosen, task_refs)])
        tasks[task] = task_entry(len(recs), majority_rate(task_refs), scores, len(candidates) if candidates else None)
        rule = [rec["rule_answer"] for _, rec in (rows[i] for i in span) if "rule_answer" in rec]
        if len(rule) == len(recs):  # data.rule_baselines: the lookup rule's score on the same questions
            tasks[task]["rule_baseline"] = _finite_dict(
                proportion([normalize_answer(a) == normalize_answer(r) for a, r in zip(rule, task_refs)]).as_dict())

    overall = text_scores(preds, refs, resamples=cfg.bootstrap_resamples)
    chosen_rows = [i for i, p in enumerate(picks) if p is not None]
    if chosen_rows:
        overall["choice_accuracy"] = proportion(
            [normalize_answer(picks[i]) == normalize_answer(refs[i]) for i in chosen_rows])
    n = len(rows)
    baseline = sum(t["n"] * t["majority_baseline"] for t in tasks.values()) / n if n else math.nan
    report = {"overall": task_entry(n, baseline, overall), "tasks": tasks}
    return report, _samples([task for task, _ in rows], pairs, prompts, preds, picks, kls)


def _samples(tasks: list[str], pairs: list[tuple[list[dict], str]], prompts: list[str], preds: list[str],
             picks: list[str | None], kls: list[list[float]] | None) -> list[dict]:
    """One sample per held-out question. `prompt` is the question for readers; `rendered_prompt` the exact text
    the answer was generated from (every earlier turn included), which the rewards score."""
    samples = []
    for i, (task, (messages, ref)) in enumerate(zip(tasks, pairs)):
        sample = {"task": task, "prompt": messages[-1]["content"], "rendered_prompt": prompts[i], "reference": ref,
                  "prediction": preds[i]}
        if picks[i] is not None:
            sample["choice"] = picks[i]
        if kls is not None:
            sample.update(answer_kl(kls[i]))
        samples.append(sample)
    return samples


def evaluate_heldout(
    model,
    tokenizer,
    *,
    tokenized_dir: Path,
    aligned_dir: Path,
    cfg: EvaluateConfig,
    template_name: str,
    system_prompt: str | None,
    max_samples: int | None = None,
    phases: PhaseTimer | None = None,
    reference=None,
) -> Evaluation:
    """Score one loaded model on the held-out sets: perplexities and the per-task report, flattened; with a
    `reference` model, the answers' KL to it too (components.evaluation.divergence)."""
    phase = phases or (lambda _: nullcontext())
    n_ppl = min(cfg.perplexity_max_samples, max_samples or cfg.perplexity_max_samples)
    with phase("perplexity"):
        result = Evaluation(metrics=_perplexities(model, tokenizer, tokenized_dir, n_ppl))
    eval_file = Path(aligned_dir) / "sft_eval.jsonl"
    if eval_file.is_file():
        records = list(iter_records(eval_file))
        if records:
            result.per_task, result.samples = score_heldout(
                model, tokenizer, records, cfg=cfg, template_name=template_name, system_prompt=system_prompt,
                max_samples=max_samples, phases=phases, reference=reference)
            result.metrics.update(flatten_report(result.per_task))
            if reference is not None:
                result.metrics.update(kl_metrics(result.samples))
    return result


def evaluate_model(model, tokenizer, **kwargs) -> tuple[dict[str, float], list[dict]]:
    """(flat metrics, samples) of `evaluate_heldout` with the same keyword arguments (quantize scores with it)."""
    result = evaluate_heldout(model, tokenizer, **kwargs)
    return result.metrics, result.samples


def write_evaluation(out_dir: Path, evaluation: Evaluation, prefix: str = "") -> list[str]:
    """metrics.json, samples.jsonl and (when there were held-out instructions) per_task.json."""
    atomic_write_json(out_dir / f"{prefix}metrics.json", evaluation.metrics)
    write_samples(out_dir / f"{prefix}samples.jsonl", evaluation.samples)
    files = [f"{prefix}metrics.json", f"{prefix}samples.jsonl"]
    if evaluation.per_task:
        atomic_write_json(out_dir / f"{prefix}per_task.json", evaluation.per_task)
        files.append(f"{prefix}per_task.json")
    return files


def run_evaluate(model, tokenizer, out_dir: Path, **kwargs) -> StageResult:
    """Score `model` (evaluate_heldout's keyword arguments), run the configured harness tasks, write the files."""
    out_dir = Path(out_dir)
    return _finish(out_dir, *_score(model, tokenizer, out_dir, **kwargs))


def _score(model, tokenizer, out_dir: Path, **kwargs) -> tuple[Evaluation, dict]:
    """evaluate_heldout, then the configured harness tasks (their harness.json written into out_dir)."""
    phases, reference = kwargs.pop("phases", None), kwargs.pop("reference", None)
    evaluation = evaluate_heldout(model, tokenizer, phases=phases, reference=reference, **kwargs)
    info: dict = {}
    cfg: EvaluateConfig = kwargs["cfg"]
    if cfg.harness_tasks:
        from components.evaluation.harness import run_harness

        harness = run_harness(
            model, tokenizer, cfg.harness_tasks, aligned_dir=Path(kwargs["aligned_dir"]),
            template_name=kwargs["template_name"], system_prompt=kwargs["system_prompt"],
            batch_size=cfg.batch_size, limit=cfg.harness_limit,
        )
        evaluation.metrics.update(harness.metrics)
        atomic_write_json(out_dir / "harness.json", harness.as_dict())
        info["harness_skipped"] = harness.skipped
    return evaluation, info


def _finish(out_dir: Path, evaluation: Evaluation, info: dict) -> StageResult:
    """Write the evaluation's files once, all measures in: metrics.json, samples.jsonl, per_task.json."""
    files = write_evaluation(out_dir, evaluation) + (["harness.json"] if "harness_skipped" in info else [])
    log.info("evaluation: %s", {k: round(v, 4) for k, v in evaluation.metrics.items() if "/" not in k})
    return StageResult(files=files, reports=files, metrics=evaluation.metrics, info=info)  # every file a report


def evaluate_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline): the base with the adapters among the inputs merged
    in (none for evaluate-base), scored on the held-out sets. The alignment measures (KL to the model it
    was aligned from, sampled and per-answer rewards) annotate the same samples before anything is written."""
    base = inputs.base_model
    out_dir = Path(out_dir)
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
    phases = PhaseTimer()
    with phases("load"):
        model = load_for_inference(base.source, inputs.adapter_stack(), hardware, **base.load_kwargs())
        tokenizer = load_tokenizer(base.source, **base.load_kwargs())
        # An aligned model is compared with the model it was aligned from, in lockstep while it answers: the
        # adapter stack without its last entry, the model the evaluate-adapted node just scored (kept).
        reference = (load_for_inference(base.source, inputs.adapter_stack()[:-1], hardware, **base.load_kwargs())
                     if inputs.has("alignment") else None)
    evaluation, info = _score(
        model, tokenizer, out_dir, tokenized_dir=inputs.dir("tokenize", reading=HELDOUT_READS["tokenize"]),
        aligned_dir=inputs.dir("align", reading=HELDOUT_READS["align"]),
        cfg=cfg.evaluate, template_name=cfg.tokenize.template, system_prompt=cfg.tokenize.system_prompt,
        phases=phases, reference=reference,
    )
    samples, metrics = evaluation.samples, evaluation.metrics
    del reference
    if cfg.evaluate.sample_k and cfg.alignment.reward.rule:
        with phases("sampled_rewards"):
            metrics.update(_sampled_rewards(model, cfg, samples, tokenizer))
    with phases("answer_rewards"):
        metrics.update(_answer_rewards(cfg, inputs, samples, tokenizer, hardware, policy=model))
    del model
    info["phase_s"] = phases.seconds
    log.info("evaluation phases (s): %s", {k: round(v, 1) for k, v in phases.seconds.items()})
    return _finish(out_dir, evaluation, info)


class PhaseTimer:
    """Wall seconds per named phase of an evaluation (summed over repeats), for the manifest's info and
    bench/eval_profile.py: where an evaluate node's time goes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def write_samples(path: Path, samples: list[dict]) -> None:
    """An evaluation's samples.jsonl: one scored held-out answer per line (the stdlib keeps NaN, orjson would not)."""
    atomic_write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def _sampled_rewards(model, cfg: PipelineConfig, samples: list[dict], tokenizer) -> dict:
    """The mean verifiable reward of `evaluate.sample_k` sampled answers per held-out question (seeded),
    overall with an interval and per task; each question's mean goes into its sample as
    `sampled_verifiable_reward` (so columns compare pairwise) and its answers as `sampled`."""
    from components.alignment.rewards import load_rule
    from components.alignment.sampling import sample
    from components.evaluation.compare import mean_by_task

    if not samples:
        return {}
    ecfg, prompts = cfg.evaluate, [s["rendered_prompt"] for s in samples]
    answers, _ = sample(model, tokenizer, prompts, k=ecfg.sample_k, temperature=ecfg.sample_temperature, top_p=1.0,
                        max_new_tokens=ecfg.max_new_tokens, eos=stop_ids(tokenizer, cfg.tokenize.template),
                        batch_size=ecfg.batch_size, seed=0)
    flat = [(i, a) for i, group in enumerate(answers) for a in group]
    scores = load_rule(cfg.alignment.reward.rule)(
        [prompts[i] for i, _ in flat], [a for _, a in flat], reference=[samples[i]["reference"] for i, _ in flat],
        task=[samples[i].get("task", "") for i, _ in flat])
    per_question = [0.0] * len(samples)
    for (i, _), score in zip(flat, scores, strict=True):
        per_question[i] += float(score) / ecfg.sample_k
    for sample_row, group, mean in zip(samples, answers, per_question):
        sample_row.update(sampled=group, sampled_verifiable_reward=mean)
    return mean_by_task("sampled_verifiable_reward", per_question, [s.get("task", "") for s in samples],
                        resamples=ecfg.bootstrap_resamples)


def _answer_rewards(cfg: PipelineConfig, inputs: StageInputs, samples: list[dict], tokenizer, hardware,
                    policy=None) -> dict:
    """The held-out answers' verifiable reward, reward-model score (when the reward stage ran), length and
    diversity (components.alignment.scoring), so base, SFT and aligned models compare on them. Rewards see
    each answer's own generation prompt (the sample's rendered_prompt), earlier turns included. The node's
    `policy`, when it is the model the reward model was trained on (the adapted node's), is copied into
    the reward model instead of loading that stack again."""
    from components.alignment.data import turn_end
    from components.alignment.rewards import RewardModel
    from components.alignment.scoring import response_metrics

    if not samples:
        return {}
    prompts = [s["rendered_prompt"] for s in samples]
    reward_model = None
    if inputs.has("reward"):
        reward = inputs.upstream["reward"]["info"]
        below = [Path(p) for p in reward["reward_below"]]
        same = [p.resolve() for p in below] == [Path(p).resolve() for p in inputs.adapter_stack()]
        reward_model = RewardModel(inputs.base_model, below, Path(reward["reward_adapter"]), hardware, tokenizer,
                                   stop=turn_end(tokenizer, cfg.tokenize.template), max_length=cfg.reward.max_length,
                                   batch_size=cfg.evaluate.batch_size, policy=policy if same else None)
    metrics, per_answer = response_metrics(
        prompts, [s["prediction"] for s in samples], [s["reference"] for s in samples],
        [s.get("task", "") for s in samples], rule=cfg.alignment.reward.rule, reward_model=reward_model,
        resamples=cfg.evaluate.bootstrap_resamples)
    if reward_model is not None:  # answers it saw with the start of their prompt cut off (reward.max_length)
        metrics["reward_model_prompts_cut"] = float(reward_model.cut_rows)
    if per_answer:  # each answer's scores beside it, so two models' answers compare question by question
        for i, sample in enumerate(samples):
            sample.update({name: scores[i] for name, scores in per_answer.items()})
    return metrics
