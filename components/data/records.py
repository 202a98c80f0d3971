"""The standard records every input format is aligned to.

They follow TRL's named dataset types, so TRL trainers take our aligned data as is:

- text:          {"text": str}
- conversation:  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                                "tool_calls"?: [{"name": str, "arguments": dict, "id"?: str}],
                                "tool_call_id"?: str, "name"?: str,   (a tool result: the call it answers)
                                "train"?: false}],                    (an assistant turn with no loss)
                  "tools"?: str (JSON list of tool schemas)}
- preference:    {"prompt": [messages...], "chosen": [assistant message], "rejected": [assistant message]}
- unpaired_preference: {"prompt": [messages...], "completion": [assistant message], "label": bool}
                  (TRL's unpaired preference type, for KTO; from LLaMA-Factory's `kto_tag` column)

Any record may also carry row metadata mapped in dataset_info.json's `columns`: `"task": str` (a label
evaluation groups its metrics by). Consumers read the keys they know and ignore the rest.

Aligned data is written as JSONL, one record per line, per group (cpt, cpt_eval, sft, sft_eval, preference, kto, prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

Kind = Literal["text", "conversation", "preference", "unpaired_preference"]
ROLES = ("system", "user", "assistant", "tool")
# The label of a token no loss is computed on in tokenized rows (torch's cross_entropy ignore_index).
IGNORE = -100

# The kind each data group of the pipeline config must align to.
GROUP_KINDS: dict[str, Kind] = {
    "cpt": "text",
    "cpt_eval": "text",
    "sft": "conversation",
    "sft_eval": "conversation",
    "preference": "preference",
    "preference_eval": "preference",
    "kto": "unpaired_preference",
    "prompts": "conversation",
}
# Groups no stage trains on token by token: the sampling alignment methods render their prompts themselves.
UNTOKENIZED_GROUPS = ("prompts",)

# Groups whose datasets are merged by `data.mix_strategy`; evaluation groups are always concatenated,
# so held-out sets are scored whole.
MIXED_GROUPS = ("cpt", "sft", "preference")


def interleave_probs_problem(groups: Mapping[str, Sequence[str]], mix_strategy: str, probs: Sequence[float] | None,
                             group_name: Callable[[str], str] = lambda g: f"group '{g}'") -> str | None:
    """What is wrong with `data.interleave_probs` for these groups and strategy, or None.

    One rule for the config (checked at load, naming `data.<group>`) and the align stage (naming the group).
    """
    if probs is None:
        return None
    if mix_strategy == "concat":
        return "interleave_probs needs mix_strategy interleave_under or interleave_over (concat takes every row)"
    if any(p <= 0 for p in probs):
        return (f"interleave_probs {list(probs)}: every probability must be > 0 "
                "(remove a dataset from its group to leave it out)")
    if abs(sum(probs) - 1) > 1e-6:
        return f"interleave_probs {list(probs)} must sum to 1 (sums to {sum(probs):g})"
    mixed = {g: names for g, names in groups.items() if g in MIXED_GROUPS and len(names) > 1}
    if not mixed:
        return "interleave_probs is set, but no training group (cpt, sft, preference) lists more than one dataset to mix"
    for group, names in mixed.items():
        if len(names) != len(probs):
            return (f"interleave_probs has {len(probs)} entries but {group_name(group)} lists {len(names)} datasets "
                    f"({', '.join(names)}); give one probability per dataset")
    return None
