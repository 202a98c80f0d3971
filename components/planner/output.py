"""The plan written out: a pipeline config that starts with the command that runs it, and a RUN.md."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from components.planner.hardware import GiB
from components.planner.recommend import Plan

LEARNING_RATE = {"full": 1e-5, "lora": 2e-4, "qlora": 2e-4}  # full fine-tuning moves every weight: 10-20x lower


def plan_config(plan: Plan, workspace: str = ".lmforge") -> dict:
    """The plan as a pipeline config dict (validates as components.config.PipelineConfig)."""
    from components.config import TrainConfig

    r = plan.request
    train: dict[str, Any] = {
        "max_steps": r.max_steps,
        "batch_size": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "learning_rate": LEARNING_RATE[plan.method],
        "gradient_checkpointing": plan.gradient_checkpointing,
        "save_steps": max(1, min(500, r.max_steps // 5)),
        "lora": {"r": plan.lora_r, "alpha": 2 * plan.lora_r, "target_modules": "all-linear"},
        "deepspeed": {"stage": plan.zero_stage, "offload": plan.offload},
    }
    if "finetuning" in TrainConfig.model_fields:
        train["finetuning"] = plan.method
    cpt = {**copy.deepcopy(train), "max_steps": max(1, r.max_steps // 3)}
    cpt["save_steps"] = max(1, min(500, cpt["max_steps"] // 5))
    return {
        "workspace": workspace,
        "model": {"base": r.model},
        "tokenize": {"cutoff_len": r.context_length, "cpt_block_size": r.context_length},
        "cpt": cpt,
        "sft": train,
        "compute": {"device": "cuda" if plan.inventory.gpus else "cpu", "precision": plan.precision},
    }


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """(setting, value) rows of the plan for a table."""
    est = plan.estimate
    rows = [
        ("model", f"{plan.shape.name} ({plan.shape.params / 1e9:.2f}B parameters)"),
        ("hardware", plan.inventory.describe()),
        ("method", plan.method + ("" if plan.method == "full" else f" (r={plan.lora_r}, all linear layers)")),
        ("precision", plan.precision),
        ("ZeRO", "off" if plan.zero_stage == 0 else f"stage {plan.zero_stage}" + (" + CPU offload" if plan.offload else "")),
        ("micro-batch x accumulation x devices",
         f"{plan.micro_batch} x {plan.grad_accum} x {plan.inventory.devices}"),
        ("tokens per step", f"{plan.tokens_per_step:,} (target {plan.request.tokens_per_step:,}, "
                            f"{plan.request.context_length} per sequence)"),
        ("gradient checkpointing", "on" if plan.gradient_checkpointing else "off"),
        ("memory per device (est.)", f"{est.total / GiB:.1f} GiB of {plan.budget_bytes / GiB:.1f} GiB usable"),
        ("  weights / grads / optimizer", f"{est.weights / GiB:.2f} / {est.gradients / GiB:.2f} / {est.optimizer / GiB:.2f} GiB"),
        ("  activations + logits", f"{est.activations / GiB:.2f} GiB"),
    ]
    if est.offloaded:
        rows.append(("  offloaded to host RAM", f"{est.offloaded / GiB:.1f} GiB per device"))
    for alt in plan.alternatives:
        if alt["method"] != plan.method:
            rows.append((f"alternative: {alt['method']}",
                         f"micro-batch {alt['micro_batch']}, {alt['gib_per_device']:.1f} GiB/device" if alt["fits"]
                         else "does not fit"))
    return rows


def run_readme(plan: Plan, config_name: str) -> str:
    """A short README for running the planned config on the server it was planned for."""
    nodes = plan.inventory.nodes
    launch = (f"Each stage runs under the `deepspeed` launcher (ZeRO-{plan.zero_stage}"
              f"{' with CPU offload' if plan.offload else ''}) on all {plan.inventory.devices} devices."
              if plan.zero_stage else "Training runs in one process on one device.")
    lines = [
        f"# Fine-tuning {plan.shape.name}: {plan.method}", "",
        f"Planned by `lmforge plan` for {plan.inventory.describe()}.", "",
        "```bash",
        "python3 -m venv .venv && . .venv/bin/activate",
        "pip install torch  # the CUDA build that matches the server's driver" if plan.inventory.gpus
        else "pip install torch==2.13.0  # CPU wheel",
        "pip install -e \".[deepspeed]\"" if plan.zero_stage else "pip install -e .",
        f"lmforge data check {config_name}   # the data and its trained tokens, before any training",
        f"lmforge run {config_name}",
        "```", "",
        "The config trains on the shipped ICD-10 example data: point `data.dataset_info` and the `data` "
        "dataset lists at your own (docs/data_formats.md) first.", "",
        launch,
        f"Micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} x {plan.inventory.devices} devices "
        f"= {plan.tokens_per_step:,} tokens per optimizer step at {plan.request.context_length} tokens per sequence.",
        f"Estimated memory per device: {plan.estimate.total / GiB:.1f} GiB "
        f"(usable {plan.budget_bytes / GiB:.1f} GiB).",
    ]
    if nodes > 1:
        lines += ["", f"Several nodes ({nodes}): list them in a DeepSpeed hostfile (`host slots=N` per line), "
                  "with passwordless ssh and pdsh between them, and the same checkout and data on each."]
    if plan.notes:
        lines += ["", *(f"- {n}" for n in plan.notes)]
    lines += ["", "If a stage runs out of memory, halve `batch_size` and double `grad_accum` (same tokens per step), "
              "or turn on `gradient_checkpointing`.", ""]
    return "\n".join(lines)


def write_plan(plan: Plan, out_dir: Path, name: str = "plan.yaml") -> tuple[Path, Path]:
    """Write the config YAML (starting with the command that runs it) and RUN.md into `out_dir`."""
    import yaml

    from components.artifacts import atomic_write_text
    from components.config import PipelineConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = plan_config(plan)
    PipelineConfig.model_validate(data)  # never write a config that would not load
    config_path = out_dir / name
    header = (f"# lmforge run {config_path}\n# Planned by `lmforge plan` for {plan.inventory.describe()}: "
              f"{plan.method}, ZeRO {plan.zero_stage or 'off'}{' + offload' if plan.offload else ''}, "
              f"~{plan.estimate.total / GiB:.1f} GiB per device.\n")
    atomic_write_text(config_path, header + yaml.safe_dump(data, sort_keys=False))
    readme = out_dir / "RUN.md"
    atomic_write_text(readme, run_readme(plan, str(config_path)))
    return config_path, readme
