"""lm-evaluation-harness on the stage's (merged) model: local task YAMLs offline, standard tasks when reachable.

`evaluate.harness_tasks` names tasks. Local ones are the YAML files in harness_tasks/ next to this
module (by file name); they read the held-out rows this module writes per task label as
heldout/<task>.jsonl ({"question", "answer", "task"}) into a scratch folder, against which their
relative `dataset_kwargs.data_files` are resolved. Any other name is an lm-eval task (pubmedqa,
medmcqa, mmlu_*): its data comes from the Hugging Face hub, so offline it is skipped with a logged
reason instead of failing the stage.

Prompts go through the model's chat template (the one training used) with the configured system
prompt. Metrics: `harness/<task>/<metric>` (acc, acc_norm, ...) with Wilson 95% intervals
(`_ci_low`, `_ci_high`) and `harness/<task>/n`.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components.data.align import iter_records
from components.data.templates import resolve_template
from components.evaluation.intervals import wilson_interval
from components.evaluation.per_task import group_by_task, metric_key_part

log = logging.getLogger(__name__)

HARNESS_TASK_DIR = Path(__file__).resolve().parent / "harness_tasks"
PROPORTIONS = ("acc", "acc_norm", "exact_match")  # per-row 0/1 metrics: a Wilson interval applies


@dataclass
class HarnessResult:
    metrics: dict[str, float] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)  # lm-eval's results per task
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why it did not run

    def as_dict(self) -> dict:
        return {"results": self.results, "skipped": self.skipped}


def local_tasks() -> dict[str, Path]:
    """The shipped task YAMLs by name."""
    return {p.stem: p for p in sorted(HARNESS_TASK_DIR.glob("*.yaml"))}


def write_heldout_rows(aligned_dir: Path, out_dir: Path) -> list[str]:
    """heldout/<task>.jsonl under `out_dir` from the aligned held-out conversations; returns the task labels."""
    eval_file = Path(aligned_dir) / "sft_eval.jsonl"
    if not eval_file.is_file():
        return []
    folder = Path(out_dir) / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    groups = group_by_task(list(iter_records(eval_file)))
    for task, records in groups.items():
        rows = []
        for rec in records:
            messages = rec["messages"]
            rows.append({"question": messages[-2]["content"], "answer": messages[-1]["content"], "task": task})
        with open(folder / f"{task}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return list(groups)


def local_task_config(path: Path, data_dir: Path) -> tuple[dict | None, str | None]:
    """A local task YAML as an lm-eval config with its data files made absolute under `data_dir`;
    (None, reason) when none of its files exists (the held-out data has no such task)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return config, None
    resolved = {}
    for split, names in (files.items() if isinstance(files, dict) else [("test", files)]):
        names = [names] if isinstance(names, str) else list(names)
        present = [str(data_dir / n) for n in names if (data_dir / n).is_file()]
        if present:
            resolved[split] = present
    if not resolved:
        return None, f"none of its data files ({files}) is in the held-out data (tasks found: " \
                     f"{', '.join(p.stem for p in sorted((data_dir / 'heldout').glob('*.jsonl'))) or 'none'})"
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
    return config, None


def harness_metrics(results: dict, n_samples: dict) -> dict[str, float]:
    """lm-eval's results ({task: {"acc,none": ...}}) as flat `harness/<task>/<metric>` metrics."""
    out: dict[str, float] = {}
    for task, values in results.items():
        prefix = f"harness/{metric_key_part(task)}/"
        n = int((n_samples.get(task) or {}).get("effective", 0))
        if n:
            out[f"{prefix}n"] = float(n)
        for key, value in values.items():
            metric, comma, _filter = key.partition(",")  # lm-eval keys metrics as "<metric>,<filter>"
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            out[f"{prefix}{metric}"] = float(value)
            if metric in PROPORTIONS and n:
                low, high = wilson_interval(round(float(value) * n), n)
                out[f"{prefix}{metric}_ci_low"], out[f"{prefix}{metric}_ci_high"] = low, high
    return out


def run_harness(model, tokenizer, task_names: list[str], *, aligned_dir: Path, template_name: str,
                system_prompt: str | None, batch_size: int = 16, limit: int | None = None) -> HarnessResult:
    """Run `task_names` with lm-eval's `simple_evaluate` on an already loaded model (see the module docstring)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local = local_tasks()
    standard = [n for n in task_names if n not in local]
    manager = TaskManager(include_defaults=bool(standard))
    unknown = [n for n in standard if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"evaluate.harness_tasks: unknown lm-eval task(s) {', '.join(unknown)}; "
                         f"local tasks: {', '.join(local) or 'none'} (or any `lm-eval ls tasks` name)")
    result = HarnessResult()
    with tempfile.TemporaryDirectory(prefix="lmforge-harness-") as tmp:
        data_dir = Path(tmp)
        write_heldout_rows(aligned_dir, data_dir)
        tasks = []
        for name in task_names:
            spec: dict | str = name
            if name in local:
                spec, why = local_task_config(local[name], data_dir)
                if spec is None:
                    result.skipped[name] = why
                    log.warning("lm-eval task %s skipped: %s", name, why)
                    continue
            try:
                tasks.extend(manager.load(spec)["tasks"].values())
            except Exception as exc:  # the hub is unreachable (offline) or the dataset is gone: skip, say why
                why = f"its data could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                result.skipped[name] = why
                log.warning("lm-eval task %s skipped: %s. Standard tasks need the Hugging Face hub; local tasks "
                            "(%s) run offline.", name, why, ", ".join(local))
        if not tasks:
            return result
        chat_tokenizer = tokenizer
        if template_name != "auto":  # prompts as training rendered them, without changing the caller's tokenizer
            chat_tokenizer = copy.deepcopy(tokenizer)
            chat_tokenizer.chat_template = resolve_template(tokenizer, template_name)
        lm = HFLM(pretrained=model, tokenizer=chat_tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=False,
            apply_chat_template=bool(getattr(chat_tokenizer, "chat_template", None)),
            system_instruction=system_prompt,
        )
    result.results = {task: dict(values) for task, values in out["results"].items()}
    result.metrics = harness_metrics(result.results, out.get("n-samples", {}))
    log.info("lm-eval: %s", {k: round(v, 4) for k, v in result.metrics.items()})
    return result
