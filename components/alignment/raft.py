"""RAFT: reward-ranked fine-tuning (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative
Foundation Model Alignment"), written here: LMFlow's implementation needs transformers < 4.35.

Each iteration samples K completions per prompt from the current policy, scores them with the
pipeline's reward, drops degenerate ones (empty, looping), keeps the best completion of each prompt
(or the best fraction of all), and fine-tunes the policy's LoRA adapter on the kept set with the
loss on the completion only. The reward, the kept set and its reward are logged per iteration.

The fine-tuning loop is a few lines here rather than a Trainer per iteration: one optimizer and one
learning-rate schedule (alignment.lr_scheduler over iterations x steps_per_iteration) live across
iterations, and sampling and training share the model in memory. After every iteration the adapter,
optimizer and schedule are checkpointed (complete marker), so a crashed run resumes at the next one.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.alignment.rewards import RewardFn, is_degenerate
from components.alignment.sampling import sample
from components.artifacts import atomic_dir
from components.errors import TrainingDiverged
from components.data.packing import pad_causal
from components.data.records import IGNORE
from components.models.loss import labeled_positions_loss
from components.stage_contract import MetricsSink
from components.training.checkpoints import COMPLETE, checkpoint_number, last_complete_checkpoint, prune_checkpoints
from components.training.lora import lr_schedule
from components.training.ppo_rollout import penalise_missing_eos

log = logging.getLogger(__name__)


def select(groups: list[list[tuple[str, float]]], keep: str, fraction: float,
           threshold: float | None = None, contested_only: bool = False) -> list[tuple[int, int, str, float]]:
    """The kept (prompt index, sample index within the prompt's group, completion, reward): each prompt's best
    non-degenerate completion, or the best `fraction` of all non-degenerate completions; with a `threshold`,
    only those rewarded above it; with `contested_only`, only from prompts whose completions did not all score
    the same. Samples are named by index: two samples may decode to one text from different tokens."""
    scored = [(i, j, text, r) for i, group in enumerate(groups) for j, (text, r) in enumerate(group)
              if not is_degenerate(text) and (threshold is None or r > threshold)
              and not (contested_only and len({score for _, score in group}) == 1)]
    if keep == "best_per_prompt":
        best: dict[int, tuple[int, int, str, float]] = {}
        for item in scored:
            if item[0] not in best or item[3] > best[item[0]][3]:
                best[item[0]] = item
        return [best[i] for i in sorted(best)]
    scored.sort(key=lambda item: -item[3])
    return scored[: max(1, round(fraction * len(scored)))] if scored else []


@dataclass
class _Round:
    """One iteration's samples: per prompt, its completions (text, reward) and their token ids, and the kept."""

    groups: list[list[tuple[str, float]]]
    ids: list[list[list[int]]]
    kept: list[tuple[int, int, str, float]]
    new_tokens: int
    unfinished: int  # answers cut at max_new_tokens without a stop token
    seconds: float


def run_raft(policy, tokenizer, prompts: list[dict], reward: RewardFn, cfg, *, cutoff_len: int, eos: list[int],
             out_dir: Path,
             metrics_sink: MetricsSink | None = None) -> tuple[dict[str, float], list[dict]]:
    """Run RAFT on `policy` (a model made trainable by training.methods.prepare_trainable) over `prompts` (dicts with
    "prompt", "messages", "reference", "task", from alignment.data.sampling_prompts); `cfg` is the
    components.config.AlignmentConfig. Returns (final metrics, per-iteration history)."""
    raft = cfg.raft
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    # What the method trains (LoRA weights, or whole layers): checkpointed by name, for any finetuning method.
    trainable = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(optimizer, cfg.lr_scheduler, cfg.warmup_ratio, raft.iterations * raft.steps_per_iteration)
    start, history = _resume(policy, trainable, optimizer, scheduler, ckpt_root)
    step = sum(h["train_steps"] for h in history)
    for it in range(start, raft.iterations):
        batch = random.Random(cfg.seed * 1000 + it).sample(prompts, min(raft.prompts_per_iteration, len(prompts)))
        sampled = _sample_and_rank(policy, tokenizer, batch, reward, cfg, eos, it)
        (out_dir / "raft").mkdir(parents=True, exist_ok=True)
        (out_dir / "raft" / f"iteration-{it}.jsonl").write_text("".join(
            json.dumps({"prompt": batch[i]["messages"][-1]["content"], "reference": batch[i]["reference"],
                        "completion": text, "reward": r}, ensure_ascii=False) + "\n" for i, _, text, r in sampled.kept))
        rows, cut_off = _training_rows(tokenizer, batch, sampled, cutoff_len)
        # Seeded shuffle: the steps cycle through the kept rows, which come ordered by prompt.
        random.Random(cfg.seed * 1000 + it + 1).shuffle(rows)
        t1 = time.perf_counter()
        losses = _fine_tune(policy, list(trainable.values()), optimizer, scheduler, rows, cfg, tokenizer.pad_token_id,
                            step, it)
        step += len(losses)
        entry = _entry(it, batch, sampled, losses, cut_off, train_seconds=time.perf_counter() - t1)
        history.append(entry)
        log.info("RAFT iteration %d: reward %.3f (max %.3f), kept %d at %.3f, loss %.3f", it, entry["reward_mean"],
                 entry["reward_max"], entry["kept"], entry["kept_reward_mean"], entry["train_loss"])
        if metrics_sink is not None:
            metrics_sink(it, {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))})
        _save_iteration(ckpt_root, it, trainable, optimizer, scheduler, history)
    first, last = history[0], history[-1]
    metrics = {"raft_reward_first": first["reward_mean"], "raft_reward_last": last["reward_mean"],
               "raft_kept_reward_last": last["kept_reward_mean"], "raft_iterations": float(len(history)),
               "raft_kept": float(sum(h["kept"] for h in history)),
               "raft_contested_prompts": float(sum(h.get("contested_prompts", 0) for h in history)),
               "train_steps": float(step)}
    return metrics, history


def _resume(policy, trainable: dict, optimizer, scheduler, ckpt_root: Path) -> tuple[int, list[dict]]:
    """(the next iteration, the history so far) from the newest complete iteration checkpoint, loaded into
    `policy`, `optimizer` and `scheduler`; (0, []) without one."""
    from safetensors.torch import load_file

    path = last_complete_checkpoint(ckpt_root, "iteration")
    if path is None:
        return 0, []
    missing = set(trainable) - set(saved := load_file(path / "trainable.safetensors"))
    if missing:
        raise ValueError(f"RAFT checkpoint {path} does not fit this policy (missing {sorted(missing)[:3]}...); "
                         "delete it to start over")
    policy.load_state_dict(saved, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if (path / "scheduler.pt").is_file():  # checkpoints from before the schedule was honoured have none
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    last = checkpoint_number(path)
    log.info("RAFT resumes after iteration %d", last)
    return last + 1, json.loads((path / "history.json").read_text())


def _sample_and_rank(policy, tokenizer, batch: list[dict], reward: RewardFn, cfg, eos: list[int], it: int) -> _Round:
    """K samples per prompt from the policy, scored (less alignment.missing_eos_penalty for an answer cut at
    max_new_tokens), and the kept ones (select)."""
    t0 = time.perf_counter()
    ids: list[list[list[int]]] = []
    completions, new_tokens = sample(policy, tokenizer, [p["prompt"] for p in batch], k=cfg.num_generations,
                                     temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                     eos=eos, seed=cfg.seed * 1000 + it, ids=ids)
    flat = [(i, j) for i, group in enumerate(completions) for j in range(len(group))]
    texts = [completions[i][j] for i, j in flat]
    scores = reward([batch[i]["prompt"] for i, _ in flat], texts, reference=[batch[i]["reference"] for i, _ in flat],
                    task=[batch[i]["task"] for i, _ in flat])
    stops = set(eos)
    finished = torch.tensor([bool(ids[i][j]) and ids[i][j][-1] in stops for i, j in flat])
    scores = penalise_missing_eos(torch.tensor(scores, dtype=torch.float64), finished,
                                  cfg.missing_eos_penalty).tolist()
    groups: list[list[tuple[str, float]]] = [[] for _ in batch]
    for (i, _), text, score in zip(flat, texts, scores):
        groups[i].append((text, score))
    raft = cfg.raft
    kept = select(groups, raft.keep, raft.keep_fraction, raft.reward_threshold, raft.contested_only)
    return _Round(groups, ids, kept, new_tokens, int((~finished).sum()), time.perf_counter() - t0)


def _training_rows(tokenizer, batch: list[dict], sampled: _Round, cutoff_len: int) -> tuple[list[dict], int]:
    """The kept samples as training rows (prompt tokens masked), and how many had no answer token left within
    `cutoff_len` (dropped: they would train on no label)."""
    # Train on the sampled tokens themselves, after the prompt's: re-encoding the decoded text could
    # merge tokens across the prompt/answer boundary and teach something that was never sampled.
    rows, cut_off = [], 0
    for i, j, _, _ in sampled.kept:
        prompt_ids = tokenizer(batch[i]["prompt"], add_special_tokens=False)["input_ids"]
        answer = sampled.ids[i][j]
        labels = ([IGNORE] * len(prompt_ids) + answer)[:cutoff_len]
        if all(label == IGNORE for label in labels):  # the prompt alone fills cutoff_len: nothing to learn
            cut_off += 1
            continue
        rows.append({"input_ids": (prompt_ids + answer)[:cutoff_len], "labels": labels})
    return rows, cut_off


def _fine_tune(policy, params: list, optimizer, scheduler, rows: list[dict], cfg, pad_id: int, step: int,
               it: int) -> list[float]:
    """raft.steps_per_iteration optimizer steps of batch_size rows each, cycling through `rows`; the losses."""
    device = next(policy.parameters()).device
    losses: list[float] = []
    policy.train()
    for s in range(cfg.raft.steps_per_iteration if rows else 0):
        chosen = [rows[(s * cfg.batch_size + j) % len(rows)] for j in range(min(cfg.batch_size, len(rows)))]
        tensors = {k: v.to(device) for k, v in pad_causal(chosen, pad_id).items()
                   if k != "num_real_tokens"}
        loss_sum, n = labeled_positions_loss(policy, tensors)
        loss = loss_sum / max(n, 1)
        if not torch.isfinite(loss):
            raise TrainingDiverged(step + s, f"RAFT fine-tuning loss is {float(loss)} in iteration {it}")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _entry(it: int, batch: list[dict], sampled: _Round, losses: list[float], cut_off: int, *,
           train_seconds: float) -> dict:
    """One iteration's line of the history (and of the metrics sink)."""
    scores = [r for group in sampled.groups for _, r in group]
    valid = [r for group in sampled.groups for text, r in group if not is_degenerate(text)]
    kept = sampled.kept
    return {
        "iteration": it, "prompts": len(batch), "completions": len(scores),
        "reward_mean": sum(scores) / len(scores), "reward_max": max(scores), "reward_min": min(scores),
        "degenerate_fraction": 1 - len(valid) / len(scores), "kept": len(kept),
        "kept_reward_mean": sum(r for *_, r in kept) / len(kept) if kept else float("nan"),
        "kept_without_answer_tokens": cut_off,  # prompts at tokenize.cutoff_len: their answer was cut away
        "unfinished_fraction": sampled.unfinished / len(scores),  # cut at max_new_tokens without a stop token
        "contested_prompts": sum(len({score for _, score in group}) > 1 for group in sampled.groups),
        "train_loss": sum(losses) / len(losses) if losses else float("nan"), "train_steps": len(losses),
        "sample_seconds": sampled.seconds, "train_seconds": train_seconds,
        "sample_tokens_per_s": sampled.new_tokens / max(sampled.seconds, 1e-9),
    }


def _save_iteration(ckpt_root: Path, it: int, trainable: dict, optimizer, scheduler, history: list[dict]) -> None:
    """Checkpoint what trains, the optimizer, the schedule and the history after iteration `it`; only the
    newest complete one is kept."""
    from safetensors.torch import save_file

    with atomic_dir(ckpt_root / f"iteration-{it}") as tmp:
        save_file({k: v.detach().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "history.json").write_text(json.dumps(history))
        (tmp / COMPLETE).write_text(str(it))
    prune_checkpoints(ckpt_root, "iteration", keep=1)
