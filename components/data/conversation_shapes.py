"""Compiling a conversation shape for the fast path: its rendering as token runs, with its mask boundaries.

A shape is a conversation's sequence of roles. Rendered once with placeholders for the contents,
and split at the tokenizer's added tokens (which tokenizers never merge with the text around
them), it becomes constant runs of token ids (role headers, end-of-turn tokens) and runs of text
into which a row fills its contents. The completion boundaries are placed in those runs; one that
falls inside a run with contents is checked on token ids per row by `ConversationEncoder`.

A shape the compiler cannot lay out exactly compiles to None, and its rows take the exact path:
a template that raises, breaks the prefix property, or renders probe contents (edge whitespace,
quotes, reasoning and tool markup) differently from a plain substitution; a boundary inside a
content or inside a token.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate, chain

from components.data.chat_render import ChatTemplate, render_template, trained_turns

log = logging.getLogger(__name__)

SENTINEL = "\ue000{}\ue001"  # private-use characters: no template or data writes them
SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
# Probe contents. A template that strips, escapes or looks inside message contents (trim, tojson,
# splitting off reasoning, spotting tool responses) renders these differently from a plain
# substitution, and such a conversation shape takes the exact path.
_PROBES = (
    " \n\t{i} \"double\" 'single' \\\\ & <b> é 中 {{ x }} {% y %}\n ",
    "<tool_response>{i}</tool_call>\n<tool_call></tool_response>",
    "<think>\n{i}\n</think>\n\n",
)


@dataclass
class Group:
    """A run of a compiled rendering: constant token ids, or a text with message contents to fill in."""

    ids: list[int] | None  # constant: its tokens; None: variable
    text: str = ""  # variable: a str.format string, {} where the contents go
    refs: tuple[int, ...] = ()  # variable: the messages whose contents fill the {}


@dataclass
class Cut:
    """A completion boundary in group `group`: after `tokens` tokens when known at compile time, else
    after `chars` characters plus the lengths of the contents `refs` (checked on token ids per row)."""

    group: int
    tokens: int | None
    chars: int = 0
    refs: tuple[int, ...] = ()


@dataclass
class Shape:
    """A conversation shape compiled: its rendering as groups, and the start and end of every trained
    completion as cuts (start, end, start, end, ...)."""

    groups: list[Group]
    cuts: list[Cut]
    verified: int = 0  # rows of this shape also encoded the exact way so far


@dataclass(frozen=True)
class AddedTokens:
    """How a tokenizer splits text at its added tokens, where that split is exact."""

    split: re.Pattern  # matches exactly the added tokens, leftmost-longest as the tokenizer does
    ids: dict[str, int]  # added token -> id
    apart: str  # a character no added token holds: texts joined by it can be searched at once


def added_token_split(backend) -> AddedTokens | None:
    """The added-token split of a Rust tokenizer, or None where splitting there would not be exact."""
    added = backend.get_added_tokens_decoder()
    if not added or getattr(backend, "encode_special_tokens", False):
        return None
    for token in added.values():
        if token.lstrip or token.rstrip or token.single_word or (token.normalized and backend.normalizer):
            return None  # the tokenizer would strip or normalize around it
    tokens = {token.content: i for i, token in added.items()}
    # A regex's leftmost-longest matches equal the tokenizer's, and a text's pieces can be encoded
    # apart, only if no token can run into another: none is a proper prefix of one, none ends with
    # what another one starts with.
    prefixes = {t[:i] for t in tokens for i in range(1, len(t) + 1)}
    proper_prefixes = {t[:i] for t in tokens for i in range(1, len(t))}
    if any(a in proper_prefixes or any(a[k:] in prefixes for k in range(1, len(a))) for a in tokens):
        return None
    split = re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")")
    probe = "".join(f"x{t}\n {t}é{t}  {_PROBES[0]}{t}y1{t}{t}" for t in list(tokens)[:64])
    parts = [[tokens[p]] if j % 2 else backend.encode(p, add_special_tokens=False).ids
             for j, p in enumerate(split.split(probe))]
    if list(chain.from_iterable(parts)) != backend.encode(probe, add_special_tokens=False).ids:
        log.info("tokenize: this tokenizer encodes text split at its added tokens differently from the whole; "
                 "the fast path encodes whole renderings")
        return None
    apart = next((c for c in ("\x00", "\ue002", "\ufffe") if not any(c in t for t in tokens)), None)
    if apart is None:
        return None
    return AddedTokens(split, tokens, apart)


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


class ShapeCompiler:
    """Compiles conversation shapes for one template, tokenizer and masking setting."""

    def __init__(self, backend, tmpl: ChatTemplate, *, train_on_prompt: bool, mask_history: bool,
                 added: AddedTokens | None):
        self.backend, self.tmpl, self.added = backend, tmpl, added
        self.train_on_prompt, self.mask_history = train_on_prompt, mask_history

    def compile(self, roles: tuple[str, ...]) -> Shape | None:
        """The shape of conversations with these roles, or None where only the exact path is safe."""
        n = len(roles)
        try:
            rendered = self._boundaries(roles, [SENTINEL.format(i) for i in range(n)])
        except Exception:  # a template error: the exact path reports it for the row
            return None
        if rendered is None:
            return None
        full, positions = rendered
        sentinels = list(SENTINEL_RE.finditer(full))
        if any(int(m.group(1)) >= n for m in sentinels):
            return None
        if any(m.start() < p < m.end() for p in positions for m in sentinels):
            return None  # a boundary inside a content
        for probe in _PROBES:  # contents must be substituted verbatim
            contents = [probe.replace("{i}", str(i)) for i in range(n)]
            try:
                real = self._boundaries(roles, contents)
            except Exception:
                return None
            text = "".join(contents[int(x)] if j % 2 else x for j, x in enumerate(SENTINEL_RE.split(full)))
            shift = [(m.end(), len(contents[int(m.group(1))]) - len(m.group(0))) for m in sentinels]
            moved = [p + sum(d for end, d in shift if end <= p) for p in positions]
            if real != (text, moved):
                return None
        return self._layout(full, positions)

    def _render_shape(self, roles: tuple[str, ...], contents: list[str], upto: int, generation: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in zip(roles[:upto], contents[:upto])]
        return render_template(self.tmpl, messages, None, add_generation_prompt=generation)

    def _boundaries(self, roles: tuple[str, ...], contents: list[str]) -> tuple[str, list[int]] | None:
        """The rendering and its completion boundaries (start, end per trained turn), or None where a
        prefix rendering is not a text prefix of the whole."""
        n = len(roles)
        full = self._render_shape(roles, contents, n, False)
        positions = []
        for i in trained_turns(roles, self.train_on_prompt, self.mask_history):
            prompt = self._render_shape(roles, contents, i, True)
            end = self._render_shape(roles, contents, i + 1, False) if i < n - 1 else full
            if not (full.startswith(prompt) and full.startswith(end)):
                return None
            positions += [len(prompt), len(end)]
        return full, positions

    def _layout(self, full: str, positions: list[int]) -> Shape | None:
        """Split a placeholder rendering into constant and variable groups and place the boundaries."""
        pieces = self.added.split.split(full) if self.added is not None else [full]
        groups: list[Group] = []
        where: list[tuple[int, int]] = []  # per piece: (group, tokens before it in that group)
        for j, piece in enumerate(pieces):
            if j % 2 == 0 and SENTINEL_RE.search(piece):
                parts = SENTINEL_RE.split(piece)  # literal, index, literal, ..., literal
                refs = tuple(int(x) for x in parts[1::2])
                groups.append(Group(None, "{}".join(map(_escape_braces, parts[::2])), refs))
                where.append((len(groups) - 1, 0))
                continue
            if not groups or groups[-1].ids is None:
                groups.append(Group([]))
            where.append((len(groups) - 1, len(groups[-1].ids)))
            if j % 2:
                groups[-1].ids.append(self.added.ids[piece])
            elif piece:
                groups[-1].ids.extend(self.backend.encode(piece, add_special_tokens=False).ids)
        ends = list(accumulate(map(len, pieces)))
        cuts = []
        for position in positions:
            j = min(bisect_right(ends, position), len(pieces) - 1)  # the piece that starts at or holds it
            offset = position - (ends[j] - len(pieces[j]))
            group, before = where[j]
            if offset == 0:
                cuts.append(Cut(group, before))
            elif j % 2:
                return None  # inside an added token
            elif groups[group].ids is not None:  # inside constant text: check its tokens once, here
                head = self.backend.encode(pieces[j][:offset], add_special_tokens=False).ids
                whole = self.backend.encode(pieces[j], add_special_tokens=False).ids
                if whole[: len(head)] != head:
                    return None
                cuts.append(Cut(group, before + len(head)))
            else:
                head = pieces[j][:offset]
                refs = tuple(int(x) for x in SENTINEL_RE.findall(head))
                cuts.append(Cut(group, None, len(SENTINEL_RE.sub("", head)), refs))
        return Shape(groups, cuts)
