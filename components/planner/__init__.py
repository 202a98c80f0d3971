"""`lmforge plan`: which fine-tuning method, batch shape and ZeRO stage fit a model on some hardware.

- hardware: the inventory (GPUs through NVML, or '8x80' for another server);
- memory: the model's shape and what training it costs per device (the formulas and their sources);
- recommend: the best method and batch shape that fit (`make_plan`);
- output: the plan as a config that loads, a table and a RUN.md (`write_plan`);
- ask: the request from a sentence through an OpenAI-compatible endpoint (`lmforge plan --ask`).
"""

from components.planner.ask import API_KEY_ENV, ask_llm
from components.planner.hardware import GiB, Gpu, Inventory, detect_inventory, host_memory_bytes, parse_gpus
from components.planner.memory import (
    KNOWN_MODELS,
    MemoryEstimate,
    Method,
    ModelShape,
    activation_bytes,
    estimate_memory,
    model_shape,
    shape_from_config,
)
from components.planner.output import LEARNING_RATE, plan_config, plan_rows, run_readme, write_plan
from components.planner.recommend import Plan, PlanRequest, make_plan, memory_budget

__all__ = [
    "API_KEY_ENV", "GiB", "Gpu", "Inventory", "KNOWN_MODELS", "LEARNING_RATE", "MemoryEstimate", "Method",
    "ModelShape", "Plan", "PlanRequest", "activation_bytes", "ask_llm", "detect_inventory", "estimate_memory",
    "host_memory_bytes", "make_plan", "memory_budget", "model_shape", "parse_gpus", "plan_config", "plan_rows",
    "run_readme", "shape_from_config", "write_plan",
]
