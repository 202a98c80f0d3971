"""The fast path of conversation encoding: compiled shapes filled row by row, checked against the exact path.

`ConversationEncoder` gives `chat_render.encode_conversations`' ids and labels several times
faster; `conversation_shapes` compiles the shapes it fills.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain

from components.data.chat_render import (
    ChatTemplate, Conversation, encode_conversations, end_of_turn, row_name, with_system_prompt,
)
from components.data.conversation_shapes import Shape, ShapeCompiler, added_token_split
from components.data.encoding import encode_texts
from components.data.records import IGNORE, ROLES

log = logging.getLogger(__name__)

CACHE_ENTRIES = 1 << 16  # encoded text pieces kept between batches (memory stays flat in the rows)
VERIFY_ROWS = 16  # rows of each conversation shape also encoded the exact way and compared
JOIN_TEXTS = 16  # new texts encoded per tokenizer input (see ConversationEncoder._encode_texts)


@dataclass
class ConversationEncoder:
    """(input_ids, labels) for batches of conversations: the exact path's result, several times faster.

    On short rows the time goes into Jinja (three renderings per one-turn row) and into encoding
    the same template text (system prompt, role headers) again and again. Instead:

    1. Each conversation shape (its sequence of roles) is rendered once, with placeholders for the
       contents, and split at the tokenizer's added tokens, which tokenizers never merge with the
       text around them. Runs without contents (role headers, end-of-turn tokens) are encoded
       then; a row only fills its contents into the other runs, and encodes the runs not seen
       before, in one batch per call (a bounded cache holds the ones seen).
    2. The completion boundaries are known from the placeholder rendering; one that falls inside
       a run with contents is checked on token ids per row: the run's text before the boundary
       must encode to a prefix of the run's tokens (the exact path's check, run by run).

    What it cannot do exactly goes through the exact path: rows with tools, tool calls, extra keys
    or an empty content; rows whose contents hold an added token's text; shapes whose template
    raises, breaks the prefix property or renders probe contents (edge whitespace, quotes,
    reasoning and tool markup) differently from a substitution; boundaries inside a token. The
    split is used only when no added token strips whitespace or overlaps another, and a probe
    encodes the same split and whole. The first `verify_rows` rows of every shape are also
    encoded the exact way; a difference moves that shape to the exact path (and is logged).
    Together these make a template that treats some contents specially very unlikely to slip
    through, though not impossible: `chat_render.encode_conversations` stays the reference.
    `counts` says how many rows took each path.
    """

    tokenizer: object
    tmpl: ChatTemplate
    system_prompt: str | None
    train_on_prompt: bool
    mask_history: bool
    verify_rows: int = VERIFY_ROWS
    counts: dict = field(default_factory=lambda: {"fast": 0, "exact": 0})

    def __post_init__(self) -> None:
        self._shapes: dict[tuple[str, ...], Shape | None] = {}
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._added = added_token_split(self._backend) if self._backend is not None else None
        self._compiler = ShapeCompiler(self._backend, self.tmpl, train_on_prompt=self.train_on_prompt,
                                       mask_history=self.mask_history, added=self._added)
        self._pieces: dict[str, list[int]] = {}  # text -> its ids, for the runs and boundary prefixes seen

    def _shape_of(self, messages, tools) -> tuple[tuple[str, ...] | None, list[str]]:
        """The roles and contents of a plain conversation (role + non-empty string content only)."""
        if tools or type(messages) is not list or not messages:
            return None, []
        roles, contents = [], []
        # An empty content, the configured system prompt's included, is rendered exactly: templates test for it.
        for message in with_system_prompt(messages, self.system_prompt):
            if type(message) is not dict or len(message) != 2:
                return None, []
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or type(content) is not str or not content:
                return None, []
            roles.append(role)
            contents.append(content)
        return tuple(roles), contents

    # -- encoding

    def encode(self, conversations: list[Conversation], where: Sequence[str] | None = None
               ) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per (messages, tools) pair; `where` names each one in error messages."""
        with gc_paused():
            return self._encode_batch(conversations, where)

    def _encode_batch(self, conversations, where):
        if self._backend is None:  # a slow tokenizer: nothing to gain
            self.counts["exact"] += len(conversations)
            return self._exact(conversations, where)
        if len(self._pieces) > CACHE_ENTRIES:
            self._pieces.clear()
        out: list = [None] * len(conversations)
        exact: list[int] = []
        # Rows grouped by shape, so that each step below runs once per group over a column of rows.
        by_shape: dict[tuple[str, ...], tuple[list[int], list[list[str]]]] = {}
        shapes = self._shapes
        for k, (messages, tools) in enumerate(conversations):
            key, contents = self._shape_of(messages, tools)
            if key is not None and key not in shapes:
                shapes[key] = self._compiler.compile(key)
            if key is None or shapes[key] is None:
                exact.append(k)
                continue
            rows = by_shape.get(key)
            if rows is None:
                rows = by_shape[key] = ([], [])
            rows[0].append(k)
            rows[1].append(contents)
        columns = {key: self._columns(shapes[key], ks, contents, exact) for key, (ks, contents) in by_shape.items()}
        verify = []
        for key, (ks, _, _) in columns.items():
            shape = shapes[key]
            n = max(0, min(len(ks), self.verify_rows - shape.verified))
            shape.verified += n
            verify += ks[:n]
        pieces = self._pieces
        texts = chain.from_iterable(col if type(col) is list else (col,) for _, texts, heads in columns.values()
                                    for col in (*texts, *heads) if col)
        new = [t for t in dict.fromkeys(texts) if t not in pieces]
        pieces.update(zip(new, self._encode_texts(new)))
        for key, (ks, texts, heads) in columns.items():
            self._assemble(shapes[key], ks, texts, heads, out, exact)
        checked = sorted(set(exact) | set(verify))
        if checked:
            invalid = set()
            results = self._exact([conversations[k] for k in checked], [row_name(where, k) for k in checked])
            for k, result in zip(checked, results):
                if out[k] is not None and out[k] != result:
                    key = next(key for key, (ks, _, _) in columns.items() if k in ks)
                    log.warning("tokenize: the fast path differs from the exact one at %s (roles %s); "
                                "encoding conversations of that shape the exact way", row_name(where, k), key)
                    shapes[key] = None
                    invalid.add(key)
                    exact.append(k)
                out[k] = result
            # Rows of this batch with a shape just found to differ: redo them the exact way too.
            done = set(checked)
            redo = [k for key in invalid for k in columns[key][0] if k not in done]
            if redo:
                results = self._exact([conversations[k] for k in redo], [row_name(where, k) for k in redo])
                for k, result in zip(redo, results):
                    out[k] = result
                exact += redo
        self.counts["exact"] += len(set(exact))
        self.counts["fast"] += len(conversations) - len(set(exact))
        return out

    def _columns(self, shape: Shape, ks: list[int], contents: list[list[str]], exact: list[int]):
        """For the rows `ks` of one shape: (rows kept, the text of each variable group per row, the
        text before each boundary inside a variable group). A group's or a head's entry is None
        where it is constant, a head's a string where it is the same for every row. Rows whose
        contents hold an added token's text go to `exact`."""
        texts: list[list[str] | None] = []
        for group in shape.groups:
            if group.ids is not None:
                texts.append(None)
            elif len(group.refs) == 1:
                fill, ref = group.text.format, group.refs[0]
                texts.append([fill(c[ref]) for c in contents])
            else:
                fill, refs = group.text.format, group.refs
                texts.append([fill(*[c[r] for r in refs]) for c in contents])
        added = self._added
        if added is not None:  # one search per column; rows only where it finds something
            split = added.split
            hits = {i for col in texts if col is not None and split.search(added.apart.join(col))
                    for i, text in enumerate(col) if split.search(text)}
            if hits:
                exact += [ks[i] for i in sorted(hits)]
                keep = [i for i in range(len(ks)) if i not in hits]
                ks, contents = [ks[i] for i in keep], [contents[i] for i in keep]
                texts = [None if col is None else [col[i] for i in keep] for col in texts]
        heads: list = []
        for cut in shape.cuts:
            if cut.tokens is not None:
                heads.append(None)
            elif not cut.refs:  # literal text only: the same for every row
                heads.append(texts[cut.group][0][: cut.chars] if ks else "")
            else:
                col, chars, refs = texts[cut.group], cut.chars, cut.refs
                heads.append([t[: chars + sum(len(c[r]) for r in refs)] for t, c in zip(col, contents)])
        return ks, texts, heads

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Encode texts that hold no added token. Joined a few at a time by an added token, which
        the tokenizer splits at: it spends about as long per call as on a dozen short words."""
        if self._added is None or len(texts) < 2:
            return encode_texts(self.tokenizer, texts)
        separator, separator_id = next(iter(self._added.ids.items()))
        joined = [separator.join(texts[i : i + JOIN_TEXTS]) for i in range(0, len(texts), JOIN_TEXTS)]
        out = []
        for ids in encode_texts(self.tokenizer, joined):
            start = 0
            for _ in range(ids.count(separator_id)):
                end = ids.index(separator_id, start)
                out.append(ids[start:end])
                start = end + 1
            out.append(ids[start:])
        if len(out) != len(texts):  # cannot happen when the split is exact; never trust a miscount
            return encode_texts(self.tokenizer, texts)
        return out

    def _exact(self, conversations, where):
        return encode_conversations(self.tokenizer, self.tmpl, conversations, system_prompt=self.system_prompt,
                                    train_on_prompt=self.train_on_prompt, mask_history=self.mask_history,
                                    where=where)

    def _assemble(self, shape: Shape, ks: list[int], texts: list, heads: list, out: list, exact: list[int]) -> None:
        """(input_ids, labels) into out[k] for the rows `ks` of one shape, from `_columns`' texts
        and heads; a row whose boundary falls inside a token goes to `exact`."""
        if not ks:
            return
        pieces = self._pieces
        segments = [(group.ids, col) for group, col in zip(shape.groups, texts)]
        if self.train_on_prompt:
            for i, k in enumerate(ks):
                ids = list(chain.from_iterable(const if col is None else pieces[col[i]] for const, col in segments))
                out[k] = (ids, list(ids))
            return
        cuts = [(cut.group, cut.tokens, pieces[head] if type(head) is str else None, head if type(head) is list else None)
                for cut, head in zip(shape.cuts, heads)]
        stop = self.tmpl.stop_id
        for i, k in enumerate(ks):
            encoded = [const if col is None else pieces[col[i]] for const, col in segments]
            ids = list(chain.from_iterable(encoded))
            starts = list(accumulate(map(len, encoded), initial=0))
            bounds = []
            for group, tokens, head_ids, head_col in cuts:
                if tokens is None:
                    if head_col is not None:
                        head_ids = pieces[head_col[i]]
                    tokens = len(head_ids)
                    if encoded[group][:tokens] != head_ids:
                        exact.append(k)  # the boundary falls inside a token
                        break
                bounds.append(starts[group] + tokens)
            else:
                n = len(ids)
                if len(bounds) == 2:  # one trained turn: build the labels in one go
                    start = bounds[0]
                    end = end_of_turn(ids, start, bounds[1], stop)
                    labels = [IGNORE] * start + ids[start:end] + [IGNORE] * (n - end)
                else:
                    labels = [IGNORE] * n
                    for t in range(0, len(bounds), 2):
                        start = bounds[t]
                        end = end_of_turn(ids, start, bounds[t + 1], stop)
                        labels[start:end] = ids[start:end]
                out[k] = (ids, labels)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one batch.

    A batch allocates many small lists and dicts that live until it ends, and no reference cycles:
    the collector would walk them again and again for nothing (it took over half the time).
    Reference counting still frees everything; collection resumes after the batch.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
