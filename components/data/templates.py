"""Chat formats for models that ship without a chat template: one table, rendered to Jinja.

Prefer the tokenizer's own template (`tokenize.template: auto`). The table below is for base
models without one. Each format is data: the text around each role's content, the string that
ends an assistant turn (`stop`, what generation stops on) and whether the format has a system
turn of its own (else the system prompt is folded into the first user turn, as Gemma and
Mistral do). `jinja_template` turns a format into a standard chat template, so the same
string works with `tokenizer.apply_chat_template` and with our masking in `chat_render.py`.

Markers inside the pieces: `{bos}` and `{eos}` become the tokenizer's bos/eos token (empty
when it has none), so formats that end turns with the model's own eos adapt to each model.

Tool use in our templates (all of them, one convention, JSON throughout):
- `tools` (a list of JSON schemas) is appended to the system prompt, one schema per line
  after `TOOLS_HEADER`, followed by `TOOLS_FOOTER`;
- an assistant message's `tool_calls` are rendered after its content, one per call, as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hugging Face form
  `{"type": "function", "function": {...}}` and the bare `{"name", "arguments"}` both work);
- a `tool` message (a tool's result) is rendered with the format's `tool` pieces: its own
  role where the format has one (ChatML `tool`, Llama 3 `ipython`), else a user-side turn
  wrapping the result in `<tool_response>...</tool_response>`.
"""

from __future__ import annotations

from dataclasses import dataclass

TOOLS_HEADER = "You can call these tools (JSON schemas, one per line):\n"
TOOLS_FOOTER = '\nTo call a tool, answer with <tool_call>{"name": <tool name>, "arguments": <JSON object>}</tool_call>.'


@dataclass(frozen=True)
class ChatFormat:
    """How one chat format lays out a conversation. Pairs are (text before content, text after)."""

    user: tuple[str, str]
    assistant: tuple[str, str]  # [0] is also the generation prompt
    tool: tuple[str, str]
    system: tuple[str, str] | None  # None: no system turn; fold the system prompt into the first user turn
    stop: str | None  # ends an assistant turn; None: the tokenizer's eos token
    source: str  # where the layout is described publicly
    bos: bool = False  # start the conversation with the tokenizer's bos token
    system_fold: tuple[str, str] = ("", "\n\n")  # wraps the system prompt when folded into the first user turn
    # Text between the generation prompt and the answer. It belongs to the trained answer so that the
    # generation prompt never ends in a space (a trailing space would tokenize differently from " word").
    answer_lead: str = ""

    @property
    def supports_system(self) -> bool:
        return self.system is not None


_TOOL_RESPONSE = ("<tool_response>\n", "\n</tool_response>")

FORMATS: dict[str, ChatFormat] = {
    "llama2": ChatFormat(
        user=("{bos}[INST] ", " [/INST]"),
        assistant=("", " {eos}"),
        tool=("{bos}[INST] " + _TOOL_RESPONSE[0], _TOOL_RESPONSE[1] + " [/INST]"),
        system=None,
        system_fold=("<<SYS>>\n", "\n<</SYS>>\n\n"),
        stop=None,
        answer_lead=" ",
        source="Meta Llama 2 model card / llama repo chat_completion: [INST] <<SYS>> ... <</SYS>> ... [/INST]",
    ),
    "llama3": ChatFormat(
        user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
        tool=("<|start_header_id|>ipython<|end_header_id|>\n\n", "<|eot_id|>"),
        system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        stop="<|eot_id|>",
        bos=True,
        source="Meta Llama 3 model card, 'Prompt format' (header ids, <|eot_id|>, ipython role for tool output)",
    ),
    "chatml": ChatFormat(
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
        tool=("<|im_start|>tool\n", "<|im_end|>\n"),
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        stop="<|im_end|>",
        source="OpenAI ChatML (openai-python chatml.md), used by Qwen and SmolLM",
    ),
    "mistral": ChatFormat(
        user=("[INST] ", " [/INST]"),
        assistant=("", "{eos}"),
        tool=("[INST] " + _TOOL_RESPONSE[0], _TOOL_RESPONSE[1] + " [/INST]"),
        system=None,
        stop=None,
        bos=True,
        answer_lead=" ",
        source="Mistral docs, instruct format: <s>[INST] Instruction [/INST] Model answer</s>[INST] ...",
    ),
    "gemma": ChatFormat(
        user=("<start_of_turn>user\n", "<end_of_turn>\n"),
        assistant=("<start_of_turn>model\n", "<end_of_turn>\n"),
        tool=("<start_of_turn>user\n" + _TOOL_RESPONSE[0], _TOOL_RESPONSE[1] + "<end_of_turn>\n"),
        system=None,
        stop="<end_of_turn>",
        bos=True,
        source="Google Gemma formatting guide: <start_of_turn>user/model ... <end_of_turn>, no system role",
    ),
    "phi-3": ChatFormat(
        user=("<|user|>\n", "<|end|>\n"),
        assistant=("<|assistant|>\n", "<|end|>\n"),
        tool=("<|user|>\n" + _TOOL_RESPONSE[0], _TOOL_RESPONSE[1] + "<|end|>\n"),
        system=("<|system|>\n", "<|end|>\n"),
        stop="<|end|>",
        bos=True,
        source="Microsoft Phi-3 model card, 'Chat Format': <|user|> ... <|end|> <|assistant|>",
    ),
    "alpaca": ChatFormat(
        user=("### Instruction:\n", "\n\n"),
        assistant=("### Response:\n", "{eos}\n\n"),
        tool=("### Tool result:\n", "\n\n"),
        system=("", "\n\n"),
        stop=None,
        bos=True,
        source="Stanford Alpaca README: ### Instruction: / ### Response: sections",
    ),
    "vicuna": ChatFormat(
        user=("USER: ", " "),
        assistant=("ASSISTANT:", "{eos}"),
        tool=("TOOL: ", " "),
        system=("", " "),
        stop=None,
        bos=True,
        answer_lead=" ",
        source="FastChat vicuna_v1.1 conversation template: '<system> USER: ... ASSISTANT: ...</s>'",
    ),
    "default": ChatFormat(
        user=("User: ", "\n"),
        assistant=("Assistant:", "{eos}\n"),
        tool=("Tool: ", "\n"),
        system=("System: ", "\n"),
        stop=None,
        answer_lead=" ",
        source="lmforge's plain role-labelled format for base models",
    ),
}

ALIASES = {"qwen": "chatml", "phi3": "phi-3"}


def known_templates() -> list[str]:
    return sorted([*FORMATS, *ALIASES])


def chat_format(name: str) -> ChatFormat:
    """The format called `name` (aliases allowed); unknown names fail listing the known ones."""
    key = ALIASES.get(name, name)
    if key not in FORMATS:
        names = ", ".join(known_templates())
        raise ValueError(f"unknown chat template {name!r}; set tokenize.template to 'auto' or one of: {names}")
    return FORMATS[key]


def _expr(text: str) -> str:
    """A Jinja expression producing `text`, with {bos}/{eos} markers replaced by the token variables."""
    parts = []
    for i, chunk in enumerate(text.replace("{eos}", "\0eos\0").replace("{bos}", "\0bos\0").split("\0")):
        if i % 2:
            parts.append(chunk)  # the variable name: bos or eos
        elif chunk:
            parts.append("'" + chunk.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'")
    return " ~ ".join(parts) or "''"


def jinja_template(fmt: ChatFormat) -> str:
    """Render a ChatFormat as a chat template usable by `tokenizer.apply_chat_template`."""
    u0, u1 = map(_expr, fmt.user)
    a0, a1 = map(_expr, fmt.assistant)
    t0, t1 = map(_expr, fmt.tool)
    answer = f"{a0} ~ {_expr(fmt.answer_lead)} ~ content" if fmt.answer_lead else f"{a0} ~ content"
    lines = [
        "{%- set bos = bos_token if bos_token is defined and bos_token else '' -%}",
        "{%- set eos = eos_token if eos_token is defined and eos_token else '' -%}",
        "{%- set ns = namespace(system='', folded=false) -%}",
        "{%- set loop_messages = messages -%}",
        "{%- if messages and messages[0].role == 'system' -%}",
        "{%- set ns.system = messages[0].content -%}",
        "{%- set loop_messages = messages[1:] -%}",
        "{%- endif -%}",
        "{%- if tools -%}",
        "{%- set ns.system = (ns.system ~ '\\n\\n' if ns.system else '') ~ " + _expr(TOOLS_HEADER) + " -%}",
        "{%- for tool in tools -%}{%- set ns.system = ns.system ~ (tool | tojson) ~ '\\n' -%}{%- endfor -%}",
        "{%- set ns.system = ns.system ~ " + _expr(TOOLS_FOOTER.lstrip("\n")) + " -%}",
        "{%- endif -%}",
    ]
    if fmt.bos:
        lines.append("{{ bos }}")
    if fmt.system is not None:
        s0, s1 = map(_expr, fmt.system)
        lines.append("{%- if ns.system -%}{{ " + s0 + " ~ ns.system ~ " + s1 + " }}{%- endif -%}")
    lines += [
        "{%- for message in loop_messages -%}",
        "{%- set content = message.content if message.content is string else '' -%}",
        "{%- if message.role == 'user' -%}",
    ]
    if fmt.system is None:
        f0, f1 = map(_expr, fmt.system_fold)
        lines += [
            "{%- if ns.system and not ns.folded -%}",
            "{%- set content = " + f0 + " ~ ns.system ~ " + f1 + " ~ content -%}",
            "{%- set ns.folded = true -%}",
            "{%- endif -%}",
        ]
    lines += [
        "{{ " + u0 + " ~ content ~ " + u1 + " }}",
        "{%- elif message.role == 'assistant' -%}",
        "{{ " + answer + " }}",
        "{%- for call in (message.tool_calls or []) -%}",
        "{%- set call = call.function if call.function is defined else call -%}",
        "{{ ('\\n' if content or not loop.first else '') ~ '<tool_call>' ~ "
        "({'name': call.name, 'arguments': call.arguments} | tojson) ~ '</tool_call>' }}",
        "{%- endfor -%}",
        "{{ " + a1 + " }}",
        "{%- elif message.role == 'tool' -%}",
        "{{ " + t0 + " ~ content ~ " + t1 + " }}",
        "{%- elif message.role == 'system' -%}",
        "{{ raise_exception('a system message must be the first message of a conversation') }}",
        "{%- else -%}",
        "{{ raise_exception('unknown role ' ~ message.role ~ ': expected system, user, assistant or tool') }}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{ " + a0 + " }}{%- endif -%}",
    ]
    return "\n".join(lines)


TEMPLATES: dict[str, str] = {name: jinja_template(fmt) for name, fmt in FORMATS.items()}


def resolve_template(tokenizer, name: str) -> str:
    """The Jinja chat template for `name`: the tokenizer's own for 'auto', else one from the table."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one is for chat
            own = own.get("default")
        if not own:
            names = ", ".join(known_templates())
            raise ValueError(f"tokenizer has no chat template; set tokenize.template to one of: {names}")
        return own
    chat_format(name)  # validates the name
    return TEMPLATES[ALIASES.get(name, name)]


def stop_string(tokenizer, name: str) -> str | None:
    """The string that ends an assistant turn under template `name` ('auto': the tokenizer's eos)."""
    stop = None if name == "auto" else chat_format(name).stop
    return stop if stop is not None else tokenizer.eos_token
