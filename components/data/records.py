"""The standard records every input format is aligned to.

They follow TRL's named dataset types, so TRL trainers take our aligned data as is:

- text:          {"text": str}
- conversation:  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                                "tool_calls"?: [{"name": str, "arguments": dict}]}],
                  "tools"?: str (JSON list of tool schemas)}
- preference:    {"prompt": [messages...], "chosen": [assistant message], "rejected": [assistant message]}
- kto:           {"prompt": [messages...], "completion": [assistant message], "label": bool}

Aligned data is written as JSONL, one record per line, per group (cpt, cpt_eval, sft, sft_eval, preference).
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["text", "conversation", "preference", "kto"]
ROLES = ("system", "user", "assistant", "tool")

# The kind each data group of the pipeline config must align to.
GROUP_KINDS: dict[str, Kind] = {
    "cpt": "text",
    "cpt_eval": "text",
    "sft": "conversation",
    "sft_eval": "conversation",
    "preference": "preference",
}

# Groups whose datasets are merged by `data.mix_strategy`; evaluation groups are always concatenated,
# so held-out sets are scored whole.
MIXED_GROUPS = ("cpt", "sft", "preference")
