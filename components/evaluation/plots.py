"""Pictures of a run (PNG, matplotlib without a display): training curves and a per-task comparison.

`plot_training_curves` draws a stage's training_curve.json (transformers' `log_history`, one dict per
logging step; PPO's steps; RAFT's iterations); `plot_per_task` draws per-task reports (per_task.json)
side by side as grouped bars with their 95% intervals and each task's majority baseline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Panels of the training curves: (title, the series drawn when present, the series drawn only when none of
# those is: PPO logs its two losses, RAFT one fine-tuning loss per iteration).
CURVE_PANELS = (
    ("loss", ("loss", "eval_loss"), ("policy_loss", "value_loss", "train_loss")),
    ("learning rate", ("learning_rate",), ()),
    ("tokens/s", ("tokens_per_s", "tokens_per_second", "train_tokens_per_second"), ("sample_tokens_per_s",)),
    ("reward", ("reward_mean", "reward"), ()),
    ("KL to the reference", ("kl",), ()),
)
# The x axis: the optimizer step, or RAFT's iteration.
X_KEYS = ("step", "iteration")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg: no display, no global state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_training_curves(history: list[dict] | str | Path, out_png: str | Path, *, title: str | None = None) -> Path:
    """Loss, learning rate, tokens/s, reward and KL against the step (or RAFT's iteration), one panel each
    for the series present.

    `history` is the list or the path of a training_curve.json. Raises ValueError when it has none of them.
    """
    if not isinstance(history, list):
        history = json.loads(Path(history).read_text(encoding="utf-8"))
    x_key = next((k for k in X_KEYS if any(k in h for h in history)), None)
    panels = []
    for name, keys, fallback in CURVE_PANELS:
        series = _series(history, x_key, keys) or _series(history, x_key, fallback)
        if series:
            panels.append((name, series))
    if not panels:
        known = ", ".join(k for _, keys, fallback in CURVE_PANELS for k in keys + fallback)
        raise ValueError(f"no training curve to draw: no {known} against {' or '.join(X_KEYS)} in the log history")
    fig = _figure(4.2 * len(panels), 3.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, series) in zip(axes, panels):
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
        ax.set_title(name)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_per_task(per_task_by_column: dict[str, dict], out_png: str | Path, *, metric: str = "exact_match",
                  title: str | None = None) -> Path:
    """Grouped bars of `metric` per task (and overall), one bar per column (base, +cpt, adapted, ...), with
    95% interval error bars and a dashed line at each task's majority baseline."""
    columns = list(per_task_by_column)
    groups: dict[str, dict] = {}
    for report in per_task_by_column.values():
        for task, entry in report.get("tasks", {}).items():
            groups.setdefault(task, entry)
    names = [*groups, "overall"]

    def entry_of(report: dict, name: str) -> dict | None:
        return report.get("overall") if name == "overall" else report.get("tasks", {}).get(name)

    width = 0.8 / max(len(columns), 1)
    fig = _figure(max(6.0, 1.1 * len(names) * max(len(columns), 1) ** 0.5 + 2), 4.2)
    ax = fig.subplots()
    for c, column in enumerate(columns):
        xs, values, low_err, high_err = [], [], [], []
        for i, name in enumerate(names):
            m = ((entry_of(per_task_by_column[column], name) or {}).get("metrics") or {}).get(metric)
            if not m:
                continue
            xs.append(i - 0.4 + width * (c + 0.5))
            values.append(m["value"])
            low, high = m.get("ci_low"), m.get("ci_high")
            low_err.append(max(0.0, m["value"] - low) if low is not None else 0.0)
            high_err.append(max(0.0, high - m["value"]) if high is not None else 0.0)
        ax.bar(xs, values, width, yerr=[low_err, high_err], capsize=3, label=column)
    for i, name in enumerate(names):
        entry = next((e for r in per_task_by_column.values() if (e := entry_of(r, name))), None)
        baseline = (entry or {}).get("majority_baseline")
        if baseline is not None and _finite(baseline):
            ax.hlines(baseline, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                      label="majority baseline" if i == 0 else None)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=20, ha="right")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 1.05 if metric in ("exact_match", "choice_accuracy") else None)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or f"{metric.replace('_', ' ')} per task (95% intervals; dashed: majority baseline)")
    return _save(fig, out_png)


def _series(history: list[dict], x_key: str | None, keys: tuple[str, ...]) -> dict[str, list[tuple]]:
    series = {}
    for key in keys:
        points = [(h[x_key], h[key]) for h in history if key in h and x_key in h and _finite(h[key])]
        if points:
            series[key] = points
    return series


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
