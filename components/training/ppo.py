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
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.artifacts import atomic_dir, atomic_write_bytes, atomic_write_json
from components.errors import TrainingDiverged
from components.models.loss import plain_head_logits

log = logging.getLogger(__name__)

POLICY = "policy"
COMPLETE = "lmforge-complete"
MetricsSink = Callable[[int, dict[str, float]], None]
RewardFn = Callable[..., list[float]]


@dataclass
class PPOSettings:
    """PPO knobs. Field comments are the documentation (components.config mirrors them)."""

    steps: int = 20  # PPO steps (each: one batch of rollouts, then ppo_epochs passes over it)
    batch_size: int = 8  # prompts per step
    mini_batch_size: int = 4  # rollouts per optimizer step (also the chunk size of no-grad forwards)
    ppo_epochs: int = 2  # passes over each batch of rollouts
    learning_rate: float = 5e-5  # AdamW over the policy LoRA and the value head
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty to the reference
    adaptive_kl: bool = False  # adapt kl_coef toward target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # with adaptive_kl: target KL per sequence (nats, summed over response tokens)
    kl_horizon: int = 10000  # with adaptive_kl: rollouts over which the coefficient adapts
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value prediction clip, around the rollout's value
    vf_coef: float = 0.1  # weight of the value loss
    whiten_advantages: bool = True
    temperature: float = 1.0  # sampling temperature (the logprobs use the same one)
    top_p: float = 1.0
    max_new_tokens: int = 24
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    reward_suffix: str | None = None  # text the reward model saw after each answer (e.g. "<|im_end|>\n");
    # set: the EOS is dropped and this appended before the reward adapter scores; None: scored as generated
    max_kl: float | None = None  # stop (keeping the last good state) when the KL per sequence exceeds this
    save_steps: int = 10  # checkpoint every N steps
    save_total_limit: int = 2  # complete checkpoints kept
    seed: int = 42
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # stored in the adapter config; PPO itself runs without dropout
    lora_target_modules: str | list[str] = "all-linear"  # or explicit module names

    def __post_init__(self):
        problems = []
        if self.temperature <= 0:
            problems.append("temperature must be > 0 (PPO samples)")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "save_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.max_kl is not None and self.max_kl <= 0:
            problems.append("max_kl must be > 0 or None")
        if problems:
            raise ValueError("invalid PPOSettings: " + "; ".join(problems))


class AlignmentDiverged(TrainingDiverged):
    """PPO left the safe region at `step` (`what`: a NaN, or KL beyond max_kl). `checkpoint` is the
    last good state saved before raising (None when no step had passed its checks yet)."""

    def __init__(self, step: int, what: str, checkpoint: Path | None = None):
        super().__init__(step, what)
        self.checkpoint = checkpoint


# ---------------------------------------------------------------- adapters on one model

@contextlib.contextmanager
def _requires_grad_kept(model) -> Iterator[None]:
    """Restore every parameter's requires_grad flag on exit (PEFT's adapter switches flip them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def use_adapter(peft_model, name: str) -> Iterator[None]:
    """Make adapter `name` the active one for the block, then the previous one again.

    Frozen adapters stay frozen and trainable ones trainable: PEFT's set_adapter makes the adapter it
    activates trainable, so every requires_grad flag is put back, at entry and at exit.
    """
    previous = peft_model.active_adapter
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]

    def restore_flags():
        for p, flag in flags:
            p.requires_grad_(flag)

    peft_model.set_adapter(name)
    restore_flags()
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        restore_flags()


@contextlib.contextmanager
def reference_policy(peft_model) -> Iterator[None]:
    """The base model (every adapter off) for the block: the reference policy. Flags kept."""
    with _requires_grad_kept(peft_model), peft_model.disable_adapter():
        yield


def build_policy_model(base_model, settings: PPOSettings):
    """Wrap `base_model` (modified in place) with a fresh trainable LoRA adapter named "policy"."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=settings.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(base_model, config, adapter_name=POLICY)


@dataclass
class RewardAdapter:
    """A frozen LoRA adapter on the shared model plus the score head that reads its last hidden state."""

    name: str
    score: nn.Linear
    pad_token_id: int | None


_SCORE_KEY = re.compile(r"(?:^|\.)score\.(?:modules_to_save\.[^.]+\.)?(weight|bias)$")


def attach_reward_adapter(peft_model, reward_adapter_dir: Path, name: str = "reward", *,
                          pad_token_id: int | None = None) -> RewardAdapter:
    """Load a sequence-classification LoRA adapter (PEFT task SEQ_CLS, num_labels=1, as TRL's
    RewardTrainer saves it) into `peft_model` as the frozen adapter `name`, and its `score` head.

    The LoRA weights fit the base's linear layers (a SEQ_CLS model has the causal LM's decoder); the score
    head comes from `score.weight` in the adapter's safetensors. Scores then equal the standalone
    classifier's (the last non-pad token's hidden state through the head). The active adapter is unchanged.
    """
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    reward_adapter_dir = Path(reward_adapter_dir)
    weights_file = reward_adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"reward adapter {reward_adapter_dir} has no adapter_model.safetensors; "
                                "is it the reward stage's reward_adapter/ directory?")
    config = PeftConfig.from_pretrained(str(reward_adapter_dir))
    if config.peft_type != "LORA":  # PeftType is a str enum
        raise ValueError(f"reward adapter {reward_adapter_dir} is {config.peft_type}, not LoRA")
    weights = load_file(str(weights_file))
    score_weights = {m.group(1): v for k, v in weights.items() if (m := _SCORE_KEY.search(k))}
    if "weight" not in score_weights:
        raise ValueError(f"reward adapter {reward_adapter_dir} holds no score head (score.weight); train it as "
                         "a sequence classifier (task_type SEQ_CLS, modules_to_save=['score'])")
    if score_weights["weight"].shape[0] != 1:
        raise ValueError(f"reward adapter {reward_adapter_dir}: score head has {score_weights['weight'].shape[0]} "
                         "outputs; a reward model has num_labels=1")

    config = copy.deepcopy(config)
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
    with _requires_grad_kept(peft_model):
        peft_model.add_adapter(name, config)
        lora = {k: v for k, v in weights.items() if not _SCORE_KEY.search(k)}
        result = set_peft_model_state_dict(peft_model, lora, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if f".{name}." in k or "lora_" in k]
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if unexpected or missing:
        raise ValueError(f"reward adapter {reward_adapter_dir} does not fit this model: "
                         f"unexpected {unexpected[:3]}, missing {missing[:3]}; was it trained on the same base?")
    for n, p in peft_model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)

    hidden = score_weights["weight"].shape[1]
    head = nn.Linear(hidden, 1, bias="bias" in score_weights)
    with torch.no_grad():
        head.weight.copy_(score_weights["weight"].float())
        if "bias" in score_weights:
            head.bias.copy_(score_weights["bias"].float())
    head.requires_grad_(False)
    head.to(next(peft_model.parameters()).device)
    if pad_token_id is None:
        pad_token_id = peft_model.get_base_model().config.pad_token_id
    return RewardAdapter(name=name, score=head, pad_token_id=pad_token_id)


class ValueHead(nn.Module):
    """V(s_t): one linear layer on the policy's last hidden state, kept in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


# ---------------------------------------------------------------- forward passes

def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (as generate computes them), so a padded row scores like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _causal(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(model, input_ids, attention_mask) -> torch.Tensor:
    """Last hidden state (after the final norm) of the decoder body, every position."""
    body = _causal(model).base_model
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=False).last_hidden_state


def response_forward(model, query, query_mask, response, response_mask, *, temperature: float,
                     value_head: ValueHead | None = None, entropy: bool = False):
    """Per-token logprobs of `response` given `query` under `model` (a causal LM, PEFT-wrapped or not, in
    its current adapter state), the values V(s_t) before each response token, and the mean entropy.

    Queries are left-padded, responses right-padded; padded positions get logprob 0 and value 0. Only the
    response positions go through the LM head when the model's logits are a plain head on the hidden state.
    """
    input_ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    start, causal = query.shape[1], _causal(model)
    if plain_head_logits(causal):
        hidden = decoder_hidden(model, input_ids, mask)[:, start - 1 : -1]
        logits = causal.get_output_embeddings()(hidden)
    else:
        out = causal(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                     output_hidden_states=value_head is not None)
        logits = out.logits[:, start - 1 : -1]
        hidden = out.hidden_states[-1][:, start - 1 : -1] if value_head is not None else None
    logits = logits.float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    keep = response_mask.bool()
    logprobs = torch.where(keep, logp_all.gather(-1, response.unsqueeze(-1)).squeeze(-1), 0.0)
    values = torch.where(keep, value_head(hidden), 0.0) if value_head is not None else None
    ent = None
    if entropy:
        per_token = -(logp_all.exp() * logp_all).sum(-1)
        ent = masked_mean(per_token, keep)
    return logprobs, values, ent


def reward_adapter_scores(peft_model, reward: RewardAdapter, input_ids, attention_mask) -> torch.Tensor:
    """The reward adapter's score of each row: its score head on the last real (non-pad) token, as
    transformers' *ForSequenceClassification reads it."""
    with torch.no_grad(), use_adapter(peft_model, reward.name):
        hidden = decoder_hidden(peft_model, input_ids, attention_mask)
    real = attention_mask.bool()
    if reward.pad_token_id is not None:
        real &= input_ids != reward.pad_token_id
    last = (torch.arange(input_ids.shape[1], device=input_ids.device) * real).argmax(-1)
    return reward.score(hidden[torch.arange(len(last), device=last.device), last].float()).squeeze(-1)


def left_pad(rows: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(response: torch.Tensor, eos_ids: set[int], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS; pad after it. Returns (response, mask),
    trimmed to the longest kept response."""
    is_eos = torch.zeros_like(response, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response == e
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after).long()
    response = torch.where(after, pad_token_id, response)
    width = max(int(mask.sum(-1).max()), 1)
    return response[:, :width], mask[:, :width]


@contextlib.contextmanager
def _plain_sampling(model):
    """Sample from exactly the configured distribution: hide the checkpoint's generation defaults
    (repetition penalty, top_k, min_p ... from generation_config.json fill every unset field)."""
    from transformers import GenerationConfig

    causal = _causal(model)
    saved = causal.generation_config
    causal.generation_config = GenerationConfig(eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id,
                                                bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        causal.generation_config = saved


def generate(model, query, query_mask, settings: PPOSettings, *, eos_ids: set[int], pad_token_id: int):
    """Sample responses (temperature, top_p, no other warper) from `model` in its current adapter state."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                           max_new_tokens=settings.max_new_tokens, eos_token_id=sorted(eos_ids),
                           pad_token_id=pad_token_id)
    with torch.no_grad(), _plain_sampling(model):
        out = model.generate(input_ids=query, attention_mask=query_mask, generation_config=gen)
    return cut_at_eos(out[:, query.shape[1]:], eos_ids, pad_token_id)


# ---------------------------------------------------------------- PPO math

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), 0.0)


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logp - logp_ref), plus the score on each response's last token.
    Returns (rewards, per-token kl)."""
    kl = torch.where(mask.bool(), logprobs - ref_logprobs, 0.0)
    rewards = -kl_coef * kl
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(last), device=last.device), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens (values past the end count as 0).
    Returns (advantages, returns)."""
    values = torch.where(mask.bool(), values, 0.0)
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = torch.where(mask.bool(), advantages, 0.0)
    return advantages, advantages + values


def ppo_losses(new_logprobs, new_values, old_logprobs, old_values, advantages, returns, mask, settings: PPOSettings):
    """Clipped policy loss and clipped value loss (token means), and their diagnostics."""
    keep = mask.bool()
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - settings.cliprange, 1 + settings.cliprange)
    policy_loss = masked_mean(torch.max(pg1, pg2), keep)
    v_clipped = old_values + (new_values - old_values).clamp(-settings.cliprange_value, settings.cliprange_value)
    vf1, vf2 = (new_values - returns) ** 2, (v_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(vf1, vf2), keep)
    with torch.no_grad():
        stats = {
            "clip_fraction": float(masked_mean((pg2 > pg1).float(), keep)),
            "value_clip_fraction": float(masked_mean((vf2 > vf1).float(), keep)),
            "approx_kl": float(0.5 * masked_mean((new_logprobs - old_logprobs) ** 2, keep)),
        }
    return policy_loss, value_loss, stats


def next_kl_coef(kl_coef: float, kl: float, n: int, settings: PPOSettings) -> float:
    """Ziegler et al.'s adaptive controller: move the coefficient by at most 20% x n / horizon toward target."""
    if not settings.adaptive_kl:
        return kl_coef
    error = min(max(kl / settings.target_kl - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n / settings.kl_horizon)


# ---------------------------------------------------------------- checkpoints

def last_complete_checkpoint(ckpt_root: Path) -> Path | None:
    """Newest `step-N` with a complete marker; incomplete ones (a crash mid-save) are deleted."""
    if not ckpt_root.is_dir():
        return None
    found = []
    for d in ckpt_root.glob("step-*"):
        if (d / COMPLETE).exists():
            found.append((int(d.name.split("-")[1]), d))
        else:
            shutil.rmtree(d, ignore_errors=True)
    return max(found)[1] if found else None


def _write_adapter(peft_model, state: dict[str, torch.Tensor], target: Path) -> None:
    """The policy adapter as a plain LoRA adapter dir (PeftModel.from_pretrained loads it as 'default')."""
    from safetensors.torch import save_file

    config = copy.deepcopy(peft_model.peft_config[POLICY])
    config.inference_mode = True
    config.save_pretrained(str(target))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def _snapshot(peft_model, value_head, optimizer, step: int, kl_coef: float, curve: list[dict]) -> dict:
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
        (tmp / "state.json").write_text(json.dumps(snap["state"]))
        (tmp / COMPLETE).write_text(str(snap["state"]["step"]))
    complete = sorted((int(d.name.split("-")[1]), d) for d in ckpt_root.glob("step-*") if (d / COMPLETE).exists())
    for _, old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _load_checkpoint(peft_model, value_head, optimizer, ckpt: Path) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(value_head.parameters()).device
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"), device=str(device))
    set_peft_model_state_dict(peft_model, adapter, adapter_name=POLICY)
    value_head.load_state_dict(load_file(str(ckpt / "value_head.safetensors"), device=str(device)))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
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


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for e in (tokenizer.eos_token_id, _causal(model).generation_config.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(int(x) for x in e)
    if not ids:
        raise ValueError("the tokenizer and the model's generation_config name no EOS token; PPO cuts responses at it")
    return ids


def _reward_inputs(query, query_mask, response, response_mask, eos_ids, suffix_ids, pad_token_id):
    """Prompt + response as the reward model reads it: as generated, or with the EOS replaced by a suffix."""
    if not suffix_ids:
        return torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
    lengths = response_mask.sum(-1).tolist()
    rows = []
    for i, n in enumerate(lengths):
        ids = response[i, :n].tolist()
        if ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        rows.append(ids + suffix_ids)
    width = max(len(r) for r in rows)
    resp = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=query.device)
    mask = torch.zeros_like(resp)
    for i, r in enumerate(rows):
        resp[i, : len(r)] = torch.tensor(r, device=query.device)
        mask[i, : len(r)] = 1
    return torch.cat([query, resp], 1), torch.cat([query_mask, mask], 1)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _scores_from_fn(reward_fn, prompts, completions, completion_ids, rows) -> list[float]:
    columns = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r} - {"prompt"})}
    scores = reward_fn(prompts, completions, completion_ids=completion_ids, **columns)
    scores = list(scores) if scores is not None else []
    if len(scores) != len(prompts):
        raise ValueError(f"reward_fn returned {len(scores)} scores for {len(prompts)} completions")
    return [float("nan") if s is None else float(s) for s in scores]


@dataclass
class Rollout:
    """One batch of sampled responses and what every role said about them (no gradients)."""

    query: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor
    response: torch.Tensor  # (B, R) right-padded, cut after the first EOS
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # (B, R) under the policy
    ref_logprobs: torch.Tensor  # (B, R) under the reference (adapters off)
    values: torch.Tensor  # (B, R) V(s_t) from the value head
    entropy: float  # mean per-token entropy of the policy
    generate_seconds: float


def rollout(peft_model, value_head, query, query_mask, settings: PPOSettings, *, eos_ids: set[int],
            pad_token_id: int) -> Rollout:
    """Sample with the policy, then score the responses under the policy (+ value head) and the reference."""
    t0 = time.perf_counter()
    response, response_mask = generate(peft_model, query, query_mask, settings, eos_ids=eos_ids,
                                       pad_token_id=pad_token_id)
    generate_seconds = time.perf_counter() - t0
    logprobs, ref_logprobs, values, entropy_sum = [], [], [], 0.0
    with torch.no_grad():
        for s in _chunks(len(query), settings.mini_batch_size):
            args = (query[s], query_mask[s], response[s], response_mask[s])
            lp, v, ent = response_forward(peft_model, *args, temperature=settings.temperature, value_head=value_head,
                                          entropy=True)
            with reference_policy(peft_model):
                ref, _, _ = response_forward(peft_model, *args, temperature=settings.temperature)
            logprobs.append(lp), values.append(v), ref_logprobs.append(ref)
            entropy_sum += float(ent) * int(response_mask[s].sum())
    return Rollout(query, query_mask, response, response_mask, torch.cat(logprobs), torch.cat(ref_logprobs),
                   torch.cat(values), entropy_sum / max(int(response_mask.sum()), 1), generate_seconds)


def ppo_update(peft_model, value_head, optimizer, ro: Rollout, advantages, returns, settings: PPOSettings, *,
               on_nan: Callable[[str], None]) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy + value losses over shuffled minibatches; mean diagnostics.
    `on_nan` is called (and must raise) before a non-finite loss reaches the optimizer."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(len(ro.query)).tolist()
        for s in _chunks(len(order), settings.mini_batch_size):
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
    reward_weights[0] x the reward adapter's score + reward_weights[1] x reward_fn's, over those given.
    Writes out_dir/adapter (the policy adapter alone, a plain LoRA adapter), out_dir/value_head.safetensors,
    out_dir/ppo_curve.json, and checkpoints under out_dir/checkpoints/step-N (resumed from on a rerun).
    Raises AlignmentDiverged (after saving the last good state) on a NaN or a KL beyond settings.max_kl.
    Returns summary metrics.
    """
    from tqdm.auto import tqdm

    if reward_fn is None and reward_adapter is None:
        raise ValueError("run_ppo needs a reward: reward_fn, reward_adapter, or both")
    if not prompts:
        raise ValueError("run_ppo got no prompts")
    for i, row in enumerate(prompts):
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f"prompt row {i} has no 'prompt' text: {sorted(row)}")
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(tokenizer, base_model)

    torch.manual_seed(settings.seed)
    peft_model = build_policy_model(base_model, settings)
    device = next(peft_model.parameters()).device
    reward = None
    if reward_adapter is not None:
        reward = attach_reward_adapter(peft_model, reward_adapter, pad_token_id=pad_id)
    peft_model.eval()  # no dropout anywhere: rollouts and updates see the same function
    value_head = ValueHead(_causal(peft_model).config.get_text_config().hidden_size).to(device)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(f".{POLICY}." in n)
    policy_params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": policy_params}, {"params": list(value_head.parameters())}],
                                  lr=settings.learning_rate, weight_decay=0.0)
    trainable = sum(p.numel() for p in policy_params) + sum(p.numel() for p in value_head.parameters())

    encoded = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"][-settings.max_prompt_length:]
               for r in prompts]
    suffix = settings.reward_suffix
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []

    step, kl_coef, curve, resumed = 0, settings.kl_coef, [], 0
    ckpt = last_complete_checkpoint(ckpt_root)
    if ckpt is not None:
        state = _load_checkpoint(peft_model, value_head, optimizer, ckpt)
        step = resumed = state["step"]
        kl_coef, curve = state["kl_coef"], state["curve"]
        log.info("resuming PPO from %s (step %d)", ckpt, step)

    good: dict | None = None  # the newest state whose own rollout passed every check
    t_start, tokens_total = time.perf_counter(), 0

    def diverged(at: int, what: str):
        path = None
        if good is not None:
            good_step = good["state"]["step"]
            # Checkpoints newer than the last good state hold the diverging policy: a rerun must not resume there.
            for d in ckpt_root.glob("step-*"):
                if int(d.name.split("-")[1]) > good_step:
                    shutil.rmtree(d, ignore_errors=True)
            path = ckpt_root / f"step-{good_step}"
            if not (path / COMPLETE).exists():
                path = _save_checkpoint(peft_model, good, ckpt_root, settings.save_total_limit + 1)
        log.error("PPO diverged at step %d: %s; last good state: %s", at, what, path)
        raise AlignmentDiverged(at, what, path)

    bar = tqdm(total=settings.steps, initial=step, desc="ppo", disable=os.environ.get("LMFORGE_NO_PROGRESS") == "1")
    while step < settings.steps:
        step += 1
        torch.manual_seed(settings.seed * 1_000_003 + step)
        t0 = time.perf_counter()
        idx = _prompt_order(len(prompts), settings.batch_size, step, settings.seed)
        rows = [prompts[i] for i in idx]
        query, query_mask = left_pad([encoded[i] for i in idx], pad_id, device)
        ro = rollout(peft_model, value_head, query, query_mask, settings, eos_ids=eos_ids, pad_token_id=pad_id)
        B, n_tokens = len(idx), ro.response_mask.sum()

        scores = torch.zeros(B, device=device)
        parts: dict[str, float] = {}
        if reward is not None:
            r_ids, r_mask = _reward_inputs(query, query_mask, ro.response, ro.response_mask, eos_ids, suffix_ids,
                                           pad_id)
            adapter_scores = torch.cat([reward_adapter_scores(peft_model, reward, r_ids[s], r_mask[s])
                                        for s in _chunks(B, settings.mini_batch_size)])
            scores += reward_weights[0] * adapter_scores
            parts["score_adapter_mean"] = float(adapter_scores.mean())
        if reward_fn is not None:
            completion_ids = [ro.response[i, :n].tolist() for i, n in enumerate(ro.response_mask.sum(-1).tolist())]
            completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            fn_scores = torch.tensor(_scores_from_fn(reward_fn, [r["prompt"] for r in rows], completions,
                                                     completion_ids, rows), device=device, dtype=torch.float32)
            scores += reward_weights[1] * fn_scores
            parts["score_fn_mean"] = float(fn_scores.mean())

        rewards, kl_tokens = token_rewards(scores, ro.logprobs, ro.ref_logprobs, ro.response_mask, kl_coef)
        kl = float(kl_tokens.sum(-1).mean())
        bad_scores = int((~torch.isfinite(scores)).sum())
        if bad_scores:
            diverged(step, f"reward is NaN or infinite for {bad_scores} of {B} completions")
        if not math.isfinite(kl) or not torch.isfinite(ro.values).all():
            diverged(step, f"KL to the reference is {kl} (or a value is not finite)")
        if settings.max_kl is not None and kl > settings.max_kl:
            diverged(step, f"KL to the reference {kl:.3f} > max_kl {settings.max_kl}")
        # The model that produced this rollout passed its checks: it is the last good state.
        good = _snapshot(peft_model, value_head, optimizer, step - 1, kl_coef, curve)

        advantages, returns = gae(rewards, ro.values, ro.response_mask, settings.gamma, settings.lam)
        if settings.whiten_advantages:
            advantages = masked_whiten(advantages, ro.response_mask)
        losses = ppo_update(peft_model, value_head, optimizer, ro, advantages, returns, settings,
                            on_nan=lambda what: diverged(step, what))

        step_s = time.perf_counter() - t0
        tokens = int(query_mask.sum() + n_tokens)
        tokens_total += tokens
        metrics = {
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()) if B > 1 else 0.0,
            **parts,
            "kl": kl,
            "kl_coef": kl_coef,
            "entropy": ro.entropy,
            **losses,
            "response_length_mean": float(n_tokens) / B,
            "tokens_per_s": tokens / step_s,
            "generate_seconds": ro.generate_seconds,
            "step_seconds": step_s,
        }
        kl_coef = next_kl_coef(kl_coef, kl, B, settings)
        curve.append({"step": step, **metrics})
        log.info("ppo step %d: reward %.3f kl %.3f policy_loss %.4f value_loss %.4f (%.1fs)", step,
                 metrics["reward_mean"], kl, metrics["policy_loss"], metrics["value_loss"], step_s)
        if metrics_sink is not None:
            metrics_sink(step, metrics)
        if step % settings.save_steps == 0 or step == settings.steps:
            _save_checkpoint(peft_model, _snapshot(peft_model, value_head, optimizer, step, kl_coef, curve), ckpt_root,
                             settings.save_total_limit)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t_start

    from peft import get_peft_model_state_dict
    from safetensors.torch import save as safetensors_bytes

    with atomic_dir(out_dir / "adapter") as tmp:
        _write_adapter(peft_model, get_peft_model_state_dict(peft_model, adapter_name=POLICY), tmp)
    head = {k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}
    atomic_write_bytes(out_dir / "value_head.safetensors", safetensors_bytes(head))
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
        "kl_coef_last": kl_coef,
        "entropy_last": curve[-1]["entropy"] if curve else float("nan"),
        "response_length_mean": mean_of("response_length_mean", curve),
        "ppo_seconds": seconds,
        "tokens_per_s": tokens_total / max(seconds, 1e-9),
        "trainable_params": float(trainable),
        "resumed_from_step": float(resumed),
    }
