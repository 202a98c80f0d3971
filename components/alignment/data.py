"""The alignment methods' data, rendered with the pipeline's chat template so that what the reward
model, DPO and the sampling methods see is exactly what SFT trained on and evaluation asks.

- Preference pairs (TRL's preference type) become strings: the rendered prompt, and each answer
  followed by the template's end-of-turn text. Pairs whose sides are equal or empty teach nothing
  and are dropped and counted (the counts go into the stage's report).
- Sampling prompts for RAFT, PPO and GRPO come from conversation records: the prompt is everything
  before the last assistant turn, and that turn is the `reference` a verifiable reward checks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from components.data.chat_render import render_prompt
from components.data.jsonl import iter_records
from components.data.templates import stop_string


def turn_end(tokenizer, template: str) -> str:
    """The text that closes an assistant turn under `template` (what generation stops on)."""
    name = "auto" if "{%" in template or "{{" in template else template
    return stop_string(tokenizer, name) or ""


def _answer(side: list[dict] | dict | None) -> str:
    if isinstance(side, dict):
        side = [side]
    if not side:
        return ""
    return "".join(str(m.get("content") or "") for m in side if m.get("role", "assistant") == "assistant")


def preference_pairs(path: Path) -> tuple[list[dict], dict[str, int]]:
    """Aligned preference records, minus pairs that teach nothing; and the counts of what was dropped."""
    kept, counts = [], {"pairs": 0, "dropped_identical": 0, "dropped_empty": 0}
    if not Path(path).is_file():
        return kept, counts
    for record in iter_records(Path(path)):
        counts["pairs"] += 1
        chosen, rejected = _answer(record.get("chosen")), _answer(record.get("rejected"))
        if not chosen.strip() or not rejected.strip():
            counts["dropped_empty"] += 1
        elif chosen.strip() == rejected.strip():
            counts["dropped_identical"] += 1
        else:
            kept.append({"prompt": record["prompt"], "chosen": chosen, "rejected": rejected})
    counts["kept"] = len(kept)
    return kept, counts


def render_pairs(pairs: list[dict], tokenizer, template: str, system_prompt: str | None) -> list[dict]:
    """Pairs as TRL's string preference type: {"prompt", "chosen", "rejected"} with the turn end appended."""
    end = turn_end(tokenizer, template)
    return [{"prompt": render_prompt(tokenizer, template, p["prompt"], system_prompt),
             "chosen": p["chosen"] + end, "rejected": p["rejected"] + end} for p in pairs]


def unpaired(pairs: list[dict]) -> list[dict]:
    """Rendered pairs as KTO's unpaired type: each chosen answer desirable, each rejected one not."""
    out = []
    for p in pairs:
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return out


def render_unpaired(records: list[dict], tokenizer, template: str, system_prompt: str | None) -> list[dict]:
    """Aligned unpaired records {"prompt": [...], "completion": [...], "label"} as KTO strings."""
    end = turn_end(tokenizer, template)
    return [{"prompt": render_prompt(tokenizer, template, r["prompt"], system_prompt),
             "completion": _answer(r["completion"]) + end, "label": bool(r["label"])} for r in records]


def sampling_prompts(path: Path, tokenizer, template: str, system_prompt: str | None, *, limit: int,
                     seed: int) -> list[dict]:
    """Up to `limit` distinct prompts (seeded sample) from conversation records ending in an assistant turn:
    {"prompt": rendered text, "messages": prompt messages, "reference": the answer, "task": label or ""}.

    A prompt repeated in the file (`data.sft_task_weights` repeats rows, datasets overlap) is kept once, so a
    round's prompts are all different questions.
    """
    records, seen = [], set()
    for r in iter_records(Path(path)):
        if not r.get("messages") or r["messages"][-1]["role"] != "assistant":
            continue
        key = json.dumps(r["messages"], sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            records.append(r)
    if len(records) > limit:
        records = random.Random(seed).sample(records, limit)
    return [{"prompt": render_prompt(tokenizer, template, r["messages"][:-1], system_prompt),
             "messages": r["messages"][:-1], "reference": str(r["messages"][-1].get("content") or ""),
             "task": str(r.get("task") or "")} for r in records]
