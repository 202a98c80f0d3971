"""PPO for a LoRA policy, with one base model in memory for all four roles.

A PPO step needs a policy, a reference policy, a reward model and a value function. Here they share
one set of base weights:
- policy: the trainable LoRA adapter "policy" on the base model;
- reference: the same model with adapters disabled (`peft_model.disable_adapter()`);
- reward: a frozen LoRA adapter "reward" (the reward stage's sequence-classification adapter) plus its
  score head, switched in with `use_adapter`; or a plain `reward_fn(prompts, completions, **row)`; or both;
- value: a small head, Linear(hidden, 1), on the policy's last hidden state (a shared trunk).
So memory is one model plus adapters, not four models (bench/ppo_memory.py measures both).

One step (Ziegler et al. 2019; the loop of TRL's former PPOTrainer): sample prompts, generate with the
policy, score, per-token rewards = -kl_coef * (logp_policy - logp_ref) with the score added on the last
response token, GAE, whitened advantages, then `ppo_epochs` passes of clipped policy + value losses over
minibatches. Dropout stays off (eval mode) so the first minibatch's probability ratio is exactly 1.
Checkpoints (policy adapter, value head, optimizer, step state) are written to a temp dir and renamed;
a rerun resumes from the newest complete one and replays the same samples (each step reseeds from
settings.seed and the step number).

This file is the loop, its checkpoints and resume; ppo_rollout.py holds what one step computes
(the roles on the shared model, sampling, scoring, the PPO math).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from components.artifacts import atomic_dir, atomic_write_bytes, atomic_write_json
from components.errors import TrainingDiverged
from components.models.generation import left_pad
from components.runtime import progress
from components.stage_contract import MetricsSink
from components.training.checkpoints import COMPLETE, checkpoint_number, last_complete_checkpoint, prune_checkpoints
from components.training.lora import lr_schedule
from components.training.ppo_rollout import (  # noqa: F401  (the step's parts, importable from here too)
    POLICY,
    PPOSettings,
    RewardAdapter,
    RewardFn,
    Rollout,
    ValueHead,
    attach_reward_adapter,
    build_policy_model,
    causal_lm,
    chunks,
    decoder_hidden,
    eos_token_ids,
    gae,
    generate,
    masked_whiten,
    next_kl_coef,
    penalise_missing_eos,
    position_ids,
    ppo_losses,
    reference_policy,
    response_forward,
    reward_adapter_scores,
    reward_inputs,
    rollout,
    scores_from_fn,
    token_rewards,
    use_adapter,
)

log = logging.getLogger(__name__)


class AlignmentDiverged(TrainingDiverged):
    """PPO left the safe region at `step` (`what`: a NaN, or KL beyond max_kl). `checkpoint` is the
    last good state saved before raising (None when no step had passed its checks yet)."""

    def __init__(self, step: int, what: str, checkpoint: Path | None = None):
        super().__init__(step, what)
        self.checkpoint = checkpoint


# ---------------------------------------------------------------- checkpoints

def _write_adapter(peft_model, state: dict[str, torch.Tensor], target: Path) -> None:
    """The policy adapter as a plain LoRA adapter dir (PeftModel.from_pretrained loads it as 'default')."""
    from safetensors.torch import save_file

    config = copy.deepcopy(peft_model.peft_config[POLICY])
    config.inference_mode = True
    config.save_pretrained(str(target))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def _snapshot(peft_model, value_head, optimizer, scheduler, step: int, kl_coef: float, curve: list[dict]) -> dict:
    """The trainable state, copied to CPU: enough to write a checkpoint later (the last good state)."""
    from peft import get_peft_model_state_dict

    cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
    opt = optimizer.state_dict()
    return {
        "adapter": {k: cpu(v) for k, v in get_peft_model_state_dict(peft_model, adapter_name=POLICY).items()},
        "value_head": {k: cpu(v) for k, v in value_head.state_dict().items()},
        "optimizer": {"state": {i: {k: cpu(v) if torch.is_tensor(v) else v for k, v in s.items()}
                                for i, s in opt["state"].items()},
                      "param_groups": copy.deepcopy(opt["param_groups"])},
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "state": {"step": step, "kl_coef": kl_coef, "curve": list(curve)},
    }


def _save_checkpoint(peft_model, snap: dict, ckpt_root: Path, keep: int) -> Path:
    from safetensors.torch import save_file

    target = ckpt_root / f"step-{snap['state']['step']}"
    with atomic_dir(target) as tmp:
        (tmp / "adapter").mkdir()
        _write_adapter(peft_model, snap["adapter"], tmp / "adapter")
        save_file(snap["value_head"], str(tmp / "value_head.safetensors"))
        torch.save(snap["optimizer"], tmp / "optimizer.pt")
        torch.save(snap["scheduler"], tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(snap["state"]))
        (tmp / COMPLETE).write_text(str(snap["state"]["step"]))
    prune_checkpoints(ckpt_root, "step", keep)
    return target


def _load_checkpoint(peft_model, value_head, optimizer, scheduler, ckpt: Path) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(value_head.parameters()).device
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(peft_model, adapter, adapter_name=POLICY)
    value_head.load_state_dict(load_file(str(ckpt / "value_head.safetensors"), device=str(device)))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    if (ckpt / "scheduler.pt").is_file():  # checkpoints from before the schedule was honoured have none
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())


# ---------------------------------------------------------------- the loop

def _prompt_order(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompts of `step` (1-based): epochs over a fresh seeded shuffle each, so every prompt is seen once
    per epoch and a resumed run draws the same ones."""
    out, cache = [], {}
    for i in range((step - 1) * batch_size, step * batch_size):
        epoch = i // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(cache[epoch][i % n])
    return out


def ppo_update(peft_model, value_head, optimizer, ro: Rollout, advantages, returns, settings: PPOSettings, *,
               on_nan: Callable[[str], None], scheduler=None) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy + value losses over shuffled minibatches; mean diagnostics.
    `on_nan` is called (and must raise) before a non-finite loss reaches the optimizer."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(len(ro.query)).tolist()
        for s in chunks(len(order), settings.mini_batch_size):
            mb = torch.tensor(order[s], device=ro.query.device)
            new_lp, new_v, _ = response_forward(peft_model, ro.query[mb], ro.query_mask[mb], ro.response[mb],
                                                ro.response_mask[mb], temperature=settings.temperature,
                                                value_head=value_head)
            policy_loss, value_loss, stats = ppo_losses(new_lp, new_v, ro.logprobs[mb], ro.values[mb], advantages[mb],
                                                        returns[mb], ro.response_mask[mb], settings)
            loss = policy_loss + settings.vf_coef * value_loss
            if not torch.isfinite(loss):
                on_nan(f"loss is {loss.item()} (policy {policy_loss.item()}, value {value_loss.item()})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for k, v in {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v
            updates += 1
    return {k: v / updates for k, v in sums.items()}


def run_ppo(
    base_model,
    tokenizer,
    prompts: list[dict],
    settings: PPOSettings,
    out_dir: Path,
    *,
    reward_fn: RewardFn | None = None,
    reward_adapter: Path | None = None,
    reward_weights: tuple[float, float] = (1.0, 1.0),
    metrics_sink: MetricsSink | None = None,
) -> dict[str, float]:
    """PPO on `base_model` (a transformers causal LM, wrapped in place with the "policy" LoRA adapter).

    `prompts`: rows {"prompt": text already rendered with the chat template, ...}; the other fields go to
    `reward_fn` as keyword lists (with `completion_ids`). The score of a completion is
    reward_weights[0] x the reward adapter's score + reward_weights[1] x reward_fn's, over those given, less
    settings.missing_eos_penalty where the answer ran to max_new_tokens without a stop token.
    Writes out_dir/adapter (the policy adapter alone, a plain LoRA adapter), out_dir/value_head.safetensors,
    out_dir/ppo_curve.json, and checkpoints under out_dir/checkpoints/step-N (resumed from on a rerun).
    Raises AlignmentDiverged (after saving the last good state) on a NaN or a KL beyond settings.max_kl.
    Returns summary metrics.
    """
    _check_inputs(prompts, reward_fn, reward_adapter)
    run = _setup(base_model, tokenizer, prompts, settings, Path(out_dir), reward_adapter)
    bar = progress(total=settings.steps, initial=run.step, desc="ppo")
    while run.step < settings.steps:
        metrics = _step(run, tokenizer, prompts, settings, reward_fn, reward_weights)
        log.info("ppo step %d: reward %.3f kl %.3f policy_loss %.4f value_loss %.4f (%.1fs)", run.step,
                 metrics["reward_mean"], metrics["kl"], metrics["policy_loss"], metrics["value_loss"],
                 metrics["step_seconds"])
        if metrics_sink is not None:
            metrics_sink(run.step, metrics)
        if run.step % settings.save_steps == 0 or run.step == settings.steps:
            _save_checkpoint(run.peft_model, _snapshot(run.peft_model, run.value_head, run.optimizer, run.scheduler,
                                                       run.step, run.kl_coef, run.curve),
                             run.ckpt_root, settings.save_total_limit)
        bar.update(1)
    bar.close()
    return _finish(run, settings, Path(out_dir))


def _check_inputs(prompts: list[dict], reward_fn, reward_adapter) -> None:
    if reward_fn is None and reward_adapter is None:
        raise ValueError("run_ppo needs a reward: reward_fn, reward_adapter, or both")
    if not prompts:
        raise ValueError("run_ppo got no prompts")
    for i, row in enumerate(prompts):
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f"prompt row {i} has no 'prompt' text: {sorted(row)}")


@dataclass
class _PPORun:
    """What run_ppo builds once and every step reads and advances."""

    peft_model: Any
    value_head: ValueHead
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reward: RewardAdapter | None  # the reward adapter on the shared model, when one scores
    encoded: list[list[int]]  # each prompt's ids, its last max_prompt_length tokens
    suffix_ids: list[int]
    pad_id: int
    eos_ids: set[int]
    ckpt_root: Path
    trainable: int
    step: int = 0
    kl_coef: float = 0.0
    curve: list[dict] = field(default_factory=list)
    resumed: int = 0
    good: dict | None = None  # the newest state whose own rollout passed every check
    tokens_total: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def device(self) -> torch.device:
        return next(self.value_head.parameters()).device


def _setup(base_model, tokenizer, prompts: list[dict], settings: PPOSettings, out_dir: Path,
           reward_adapter: Path | None) -> _PPORun:
    """The policy adapter, the reward adapter, the value head and their optimizer on `base_model`, resumed from
    the newest complete checkpoint under out_dir/checkpoints."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(tokenizer, base_model) | set(settings.stop_ids)
    torch.manual_seed(settings.seed)
    peft_model = build_policy_model(base_model, settings)
    device = next(peft_model.parameters()).device
    reward = attach_reward_adapter(peft_model, reward_adapter, pad_token_id=pad_id) if reward_adapter else None
    peft_model.eval()  # no dropout anywhere: rollouts and updates see the same function
    value_head = ValueHead(causal_lm(peft_model).config.get_text_config().hidden_size).to(device)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(f".{POLICY}." in n)
    policy_params = [p for p in peft_model.parameters() if p.requires_grad]
    # The value head is a freshly initialised regressor: a group of its own, with its own rate and no decay.
    value_lr = settings.value_learning_rate if settings.value_learning_rate is not None else settings.learning_rate
    optimizer = torch.optim.AdamW([{"params": policy_params, "weight_decay": settings.weight_decay},
                                   {"params": list(value_head.parameters()), "lr": value_lr, "weight_decay": 0.0}],
                                  lr=settings.learning_rate)
    updates_per_step = settings.ppo_epochs * math.ceil(settings.batch_size / settings.mini_batch_size)
    scheduler = lr_schedule(optimizer, settings.lr_scheduler, settings.warmup_ratio, settings.steps * updates_per_step)
    suffix = settings.reward_suffix
    run = _PPORun(
        peft_model, value_head, optimizer, scheduler, reward,
        encoded=[tokenizer(r["prompt"], add_special_tokens=False)["input_ids"][-settings.max_prompt_length:]
                 for r in prompts],
        suffix_ids=tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else [],
        pad_id=pad_id, eos_ids=eos_ids, ckpt_root=out_dir / "checkpoints", kl_coef=settings.kl_coef,
        trainable=sum(p.numel() for p in policy_params) + sum(p.numel() for p in value_head.parameters()),
    )
    ckpt = last_complete_checkpoint(run.ckpt_root, "step")
    if ckpt is not None:
        state = _load_checkpoint(peft_model, value_head, optimizer, scheduler, ckpt)
        run.step = run.resumed = state["step"]
        run.kl_coef, run.curve = state["kl_coef"], state["curve"]
        log.info("resuming PPO from %s (step %d)", ckpt, run.step)
    return run


def _diverged(run: _PPORun, settings: PPOSettings, at: int, what: str):
    """Keep the last good state as the newest checkpoint, then raise AlignmentDiverged naming it."""
    path = None
    if run.good is not None:
        good_step = run.good["state"]["step"]
        # Checkpoints newer than the last good state hold the diverging policy: a rerun must not resume there.
        for d in run.ckpt_root.glob("step-*"):
            if checkpoint_number(d) > good_step:
                shutil.rmtree(d, ignore_errors=True)
        path = run.ckpt_root / f"step-{good_step}"
        if not (path / COMPLETE).exists():
            path = _save_checkpoint(run.peft_model, run.good, run.ckpt_root, settings.save_total_limit + 1)
    log.error("PPO diverged at step %d: %s; last good state: %s", at, what, path)
    raise AlignmentDiverged(at, what, path)


def _score(run: _PPORun, tokenizer, rows: list[dict], ro: Rollout, settings: PPOSettings, reward_fn,
           reward_weights: tuple[float, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Each response's score (the weighted reward adapter and reward_fn, less the missing-EOS penalty) and
    the parts' means."""
    B, lengths = len(rows), ro.response_mask.sum(-1).tolist()
    scores = torch.zeros(B, device=run.device)
    parts: dict[str, float] = {}
    if run.reward is not None:
        r_ids, r_mask = reward_inputs(ro.query, ro.query_mask, ro.response, ro.response_mask, run.eos_ids,
                                      run.suffix_ids, run.pad_id)
        adapter_scores = torch.cat([reward_adapter_scores(run.peft_model, run.reward, r_ids[s], r_mask[s])
                                    for s in chunks(B, settings.mini_batch_size)])
        scores += reward_weights[0] * adapter_scores
        parts["score_adapter_mean"] = float(adapter_scores.mean())
    completion_ids = [ro.response[i, :n].tolist() for i, n in enumerate(lengths)]
    if reward_fn is not None:
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        fn_scores = torch.tensor(scores_from_fn(reward_fn, [r["prompt"] for r in rows], completions, completion_ids,
                                                rows), device=run.device, dtype=torch.float32)
        scores += reward_weights[1] * fn_scores
        parts["score_fn_mean"] = float(fn_scores.mean())
    finished = torch.tensor([bool(ids) and ids[-1] in run.eos_ids for ids in completion_ids], device=run.device)
    parts["unfinished_fraction"] = float((~finished).float().mean())
    return penalise_missing_eos(scores, finished, settings.missing_eos_penalty), parts


def _step(run: _PPORun, tokenizer, prompts: list[dict], settings: PPOSettings, reward_fn,
          reward_weights: tuple[float, float]) -> dict[str, float]:
    """One PPO step (run.step + 1): rollouts of its prompts, scores, checks, GAE, ppo_epochs of updates.
    Returns the step's metrics (also appended to run.curve)."""
    run.step += 1
    step = run.step
    torch.manual_seed(settings.seed * 1_000_003 + step)
    t0 = time.perf_counter()
    idx = _prompt_order(len(prompts), settings.batch_size, step, settings.seed)
    rows = [prompts[i] for i in idx]
    query, query_mask = left_pad([run.encoded[i] for i in idx], run.pad_id, run.device)
    ro = rollout(run.peft_model, run.value_head, query, query_mask, settings, eos_ids=run.eos_ids,
                 pad_token_id=run.pad_id)
    B, n_tokens = len(idx), ro.response_mask.sum()
    scores, parts = _score(run, tokenizer, rows, ro, settings, reward_fn, reward_weights)
    rewards, kl_tokens = token_rewards(scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, run.kl_coef)
    kl = float(kl_tokens.sum(-1).mean())
    bad_scores = int((~torch.isfinite(scores)).sum())
    if bad_scores:
        _diverged(run, settings, step, f"reward is NaN or infinite for {bad_scores} of {B} completions")
    if not math.isfinite(kl) or not torch.isfinite(ro.values).all():
        _diverged(run, settings, step, f"KL to the reference is {kl} (or a value is not finite)")
    if settings.max_kl is not None and kl > settings.max_kl:
        _diverged(run, settings, step, f"KL to the reference {kl:.3f} > max_kl {settings.max_kl}")
    # The model that produced this rollout passed its checks: it is the last good state.
    run.good = _snapshot(run.peft_model, run.value_head, run.optimizer, run.scheduler, step - 1, run.kl_coef, run.curve)

    advantages, returns = gae(rewards, ro.values, ro.response_mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, ro.response_mask)
    losses = ppo_update(run.peft_model, run.value_head, run.optimizer, ro, advantages, returns, settings,
                        on_nan=lambda what: _diverged(run, settings, step, what), scheduler=run.scheduler)
    step_s = time.perf_counter() - t0
    tokens = int(query_mask.sum() + n_tokens)
    run.tokens_total += tokens
    metrics = {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if B > 1 else 0.0, **parts,
        "kl": kl, "kl_coef": run.kl_coef, "entropy": ro.entropy, **losses,
        "response_length_mean": float(n_tokens) / B, "tokens_per_s": tokens / step_s,
        "generate_seconds": ro.generate_seconds, "step_seconds": step_s,
    }
    run.kl_coef = next_kl_coef(run.kl_coef, kl, B, settings)
    run.curve.append({"step": step, **metrics})
    return metrics


def _finish(run: _PPORun, settings: PPOSettings, out_dir: Path) -> dict[str, float]:
    """Write the policy adapter, the value head and the curve; the run's summary metrics."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save as safetensors_bytes

    seconds = time.perf_counter() - run.t_start
    with atomic_dir(out_dir / "adapter") as tmp:
        _write_adapter(run.peft_model, get_peft_model_state_dict(run.peft_model, adapter_name=POLICY), tmp)
    head = {k: v.detach().cpu().contiguous() for k, v in run.value_head.state_dict().items()}
    atomic_write_bytes(out_dir / "value_head.safetensors", safetensors_bytes(head))
    curve = run.curve
    atomic_write_json(out_dir / "ppo_curve.json", {"settings": asdict(settings), "steps": curve})

    def mean_of(key: str, rows: list[dict]) -> float:
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    k = max(1, min(3, len(curve) // 3))
    return {
        "ppo_steps": float(len(curve)),
        "reward_mean_first": mean_of("reward_mean", curve[:k]),
        "reward_mean_last": mean_of("reward_mean", curve[-k:]),
        "kl_last": curve[-1]["kl"] if curve else float("nan"),
        "kl_coef_last": run.kl_coef,
        "entropy_last": curve[-1]["entropy"] if curve else float("nan"),
        "response_length_mean": mean_of("response_length_mean", curve),
        "unfinished_fraction": mean_of("unfinished_fraction", curve),
        "ppo_seconds": seconds,
        "tokens_per_s": run.tokens_total / max(seconds, 1e-9),
        "trainable_params": float(run.trainable),
        "resumed_from_step": float(run.resumed),
    }
