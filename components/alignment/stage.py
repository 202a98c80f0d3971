"""The alignment stage: one method after SFT, chosen by `alignment.method`, trained as a LoRA adapter
over the SFT model and stacked like cpt's and sft's, so evaluation, quantization and registration
take the aligned model without knowing how it was made.

- raft, ppo, grpo sample from the policy and score with the pipeline's reward (rule, reward model,
  endpoint: components.alignment.rewards), on prompts from data.prompts, else data.sft (their answers are
  the references a verifiable reward checks);
- dpo, kto, orpo, simpo learn from data.preference pairs (kto also from data.kto unpaired rows).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from components.alignment.data import (preference_pairs, render_pairs, render_unpaired, sampling_prompts, turn_end,
                                       unpaired)
from components.alignment.rewards import RewardModel, build_reward
from components.alignment.trl_methods import PREFERENCE_METHODS, train_grpo, train_preference
from components.artifacts import StageResult, atomic_write_json
from components.data.jsonl import iter_records
from components.errors import StageInputError
from components.pipeline import SAMPLING_METHODS

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)

def refuse_unscaled_fp16(method: str, precision: str) -> None:
    """RAFT and PPO step their own optimizer on weights loaded in the compute dtype, with no loss scaling: in fp16
    small gradients underflow to zero and large ones overflow. Refused there (TRL's trainers scale the loss)."""
    if precision == "fp16" and method in ("raft", "ppo"):
        raise StageInputError(
            f"alignment.method={method} trains in its own loop, which has no fp16 loss scaling, and this device "
            "computes in fp16 (no bf16): set compute.precision to fp32, or use grpo or a preference method "
            "(dpo, kto, orpo, simpo), whose trainers scale the loss")


def _preference_rows(method: str, align: Path, tokenizer, cfg) -> tuple[list[dict], dict]:
    template, system = cfg.tokenize.template, cfg.tokenize.system_prompt
    pairs, counts = preference_pairs(align / "preference.jsonl")
    rows = render_pairs(pairs, tokenizer, template, system)
    if method == "kto":
        rows = unpaired(rows)
        kto_file = align / "kto.jsonl"
        if kto_file.is_file():
            extra = render_unpaired(list(iter_records(kto_file)), tokenizer, template, system)
            counts["kto_rows"] = len(extra)
            rows += extra
    if not rows:
        raise StageInputError(f"alignment.method={method} has no usable preference rows in {align} ({counts}); "
                              "list datasets under data.preference" + (" or data.kto" if method == "kto" else ""))
    rows, counts["prompt_too_long"] = _with_answer_room(rows, tokenizer, cfg.alignment.max_length)
    if counts["prompt_too_long"]:
        log.warning("alignment: %d of %d preference rows dropped: their prompt alone fills alignment.max_length=%d, "
                    "so no answer token would be trained", counts["prompt_too_long"],
                    counts["prompt_too_long"] + len(rows), cfg.alignment.max_length)
    if not rows:
        raise StageInputError(f"alignment.method={method}: every preference prompt is at least "
                              f"alignment.max_length={cfg.alignment.max_length} tokens long, leaving no room for the "
                              "answers; raise alignment.max_length")
    return rows, counts


def _with_answer_room(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """The rows whose prompt leaves at least one answer token within `max_length`. TRL truncates a longer
    row's answers to nothing, and a mean log-probability over no tokens (ORPO, SimPO) is NaN."""
    lengths = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    kept = [r for r, ids in zip(rows, lengths) if len(ids) < max_length]
    return kept, len(rows) - len(kept)


def alignment_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline)."""
    from components.models.loading import load_tokenizer, load_with_adapters, select_hardware

    out_dir = Path(out_dir)
    acfg, method = cfg.alignment, cfg.alignment.method
    base, below = inputs.base_model, inputs.adapter_stack()
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
    refuse_unscaled_fp16(method, hardware.precision)
    tokenizer = load_tokenizer(base.source, **base.load_kwargs())
    model = load_with_adapters(base.source, below, hardware, **base.load_kwargs(),
                               attn_implementation=cfg.model.attn_implementation)
    report: dict = {"method": method}
    reward_adapter = Path(inputs.upstream["reward"]["info"]["reward_adapter"]) if inputs.has("reward") else None

    if method in PREFERENCE_METHODS:
        align = inputs.dir("align", reading=("preference.jsonl", "kto.jsonl"))
        rows, report["data"] = _preference_rows(method, align, tokenizer, cfg)
        policy, history, metrics = train_preference(method, model, tokenizer, rows, acfg, hardware, out_dir,
                                                    metrics_sink=inputs.metrics)
    elif method in SAMPLING_METHODS:
        group = "prompts" if cfg.data.prompts else "sft"
        prompts = sampling_prompts(inputs.file("align", f"{group}.jsonl"), tokenizer, cfg.tokenize.template,
                                   cfg.tokenize.system_prompt, limit=acfg.max_prompts, seed=acfg.seed)
        if not prompts:
            raise StageInputError(f"alignment.method={method} needs prompts: data.{group} "
                                  f"({', '.join(getattr(cfg.data, group))}) has no conversation ending in an "
                                  "assistant turn (the reference answer)")
        report["prompts"] = len(prompts)
        report["prompts_from"] = f"data.{group}"
        stop = turn_end(tokenizer, cfg.tokenize.template)
        model_reward = None
        if acfg.reward.model_weight > 0 and method != "ppo":  # PPO carries the reward adapter on its own model
            if reward_adapter is None:
                raise StageInputError("alignment.reward.model_weight > 0 needs the reward stage (reward.enabled)")
            model_reward = RewardModel(base, below, reward_adapter, hardware, tokenizer, stop=stop,
                                       max_length=cfg.reward.max_length)
        reward = build_reward(acfg.reward, reward_model=model_reward, without_model=method == "ppo") if (
            method != "ppo" or acfg.reward.rule or acfg.reward.http_url) else None
        if method == "grpo":
            from components.models.generation import stop_ids

            policy, history, metrics = train_grpo(model, tokenizer, prompts, reward, acfg, hardware, out_dir,
                                                  metrics_sink=inputs.metrics,
                                                  stop=stop_ids(tokenizer, cfg.tokenize.template))
        elif method == "raft":
            from components.alignment.raft import run_raft
            from components.models.generation import stop_ids
            from components.training.methods import prepare_trainable

            policy = prepare_trainable(model, acfg, hardware)
            metrics, history = run_raft(policy, tokenizer, prompts, reward, acfg, cutoff_len=cfg.tokenize.cutoff_len,
                                        eos=stop_ids(tokenizer, cfg.tokenize.template), out_dir=out_dir,
                                        metrics_sink=inputs.metrics)
        else:
            policy, history, metrics = _run_ppo(model, tokenizer, prompts, reward, reward_adapter, cfg, out_dir,
                                                inputs.metrics)
        if model_reward is not None:  # answers the reward model saw with the start of their prompt cut off
            report["reward_model_prompts_cut"] = model_reward.cut_rows
    else:
        raise ValueError(f"alignment.method={method!r} has no stage to run")

    if policy is not None:
        from components.training.methods import save_trained

        save_trained(policy, out_dir / "adapter")
    atomic_write_json(out_dir / "training_curve.json", history)
    atomic_write_json(out_dir / "alignment_report.json", report)
    metrics.update({f"data_{k}": float(v) for k, v in report.get("data", {}).items()})
    files = [str(p.relative_to(out_dir)) for p in (out_dir / "adapter").rglob("*") if p.is_file()]
    reports = ["training_curve.json", "alignment_report.json"]
    return StageResult(
        files=[*files, *reports], reports=reports, metrics=metrics,
        info={"method": method, "precision": hardware.precision, "base_source": base.source,
              "base_revision": base.revision,
              "adapter_stack": [*map(str, below), str((out_dir / "adapter").resolve())]},
    )


def _run_ppo(model, tokenizer, prompts, reward, reward_adapter, cfg, out_dir, sink):
    from components.models.generation import stop_ids
    from components.training import ppo

    acfg = cfg.alignment
    settings = ppo.PPOSettings(
        steps=acfg.max_steps, batch_size=acfg.batch_size, mini_batch_size=acfg.ppo.mini_batch_size,
        ppo_epochs=acfg.ppo.ppo_epochs, learning_rate=acfg.learning_rate, weight_decay=acfg.weight_decay,
        lr_scheduler=acfg.lr_scheduler, warmup_ratio=acfg.warmup_ratio, kl_coef=acfg.ppo.kl_coef,
        adaptive_kl=acfg.ppo.adaptive_kl, target_kl=acfg.ppo.target_kl, kl_horizon=acfg.ppo.kl_horizon,
        gamma=acfg.ppo.gamma, lam=acfg.ppo.lam, cliprange=acfg.ppo.cliprange,
        cliprange_value=acfg.ppo.cliprange_value, vf_coef=acfg.ppo.vf_coef,
        value_learning_rate=acfg.ppo.value_learning_rate,
        whiten_advantages=acfg.ppo.whiten_advantages, temperature=acfg.temperature, top_p=acfg.top_p,
        max_new_tokens=acfg.max_new_tokens, max_kl=acfg.max_kl, missing_eos_penalty=acfg.missing_eos_penalty,
        stop_ids=tuple(stop_ids(tokenizer, cfg.tokenize.template)),  # one stop rule with RAFT and evaluation
        save_steps=acfg.save_steps, seed=acfg.seed,
        max_grad_norm=acfg.max_grad_norm, max_prompt_length=cfg.tokenize.cutoff_len,
        # The reward model was trained on answers followed by the turn end: score PPO's answers the same way.
        reward_suffix=turn_end(tokenizer, cfg.tokenize.template) or None,
        lora_r=acfg.lora.r, lora_alpha=acfg.lora.alpha, lora_dropout=acfg.lora.dropout,
        lora_target_modules=acfg.lora.target_modules, lora_use_rslora=acfg.lora.use_rslora,
        lora_use_dora=acfg.lora.use_dora,
    )
    use_model = acfg.reward.model_weight > 0
    if use_model and reward_adapter is None:
        raise StageInputError("alignment.reward.model_weight > 0 needs the reward stage (reward.enabled)")
    rows = [{k: v for k, v in p.items() if k != "messages"} for p in prompts]
    metrics = ppo.run_ppo(model, tokenizer, rows, settings, Path(out_dir), reward_fn=reward,
                          reward_adapter=reward_adapter if use_model else None,
                          reward_weights=(acfg.reward.model_weight, 1.0), metrics_sink=sink)
    history = json.loads((Path(out_dir) / "ppo_curve.json").read_text())["steps"]  # its settings stay in ppo_curve.json
    return None, history, metrics  # run_ppo wrote out_dir/adapter (the policy adapter alone) itself
