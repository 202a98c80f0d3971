"""Packing tokens: the plain-text corpus into fixed blocks, and tokenized examples into training batches.

The corpus is packed once, at the tokenize stage (`tokenize_text_corpus`). Batches are packed per
step: padding-free (`flatten_batch`), several examples in one row with position ids restarting
per example, so attention kernels that read position ids (flash-attention varlen, or a
block-diagonal mask built from them) keep examples apart and no compute is spent on pad tokens;
or right-padded without a mask (`pad_causal`), the fastest on CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING

from components.data.encoding import encode_texts
from components.data.records import IGNORE

if TYPE_CHECKING:
    import torch

DOCS_PER_BATCH = 2048  # documents encoded at a time while packing the corpus (bounds memory)


def tokenize_text_corpus(tokenizer, texts: Iterable[str], block_size: int) -> Iterator[dict]:
    """Pack documents (each followed by eos) greedily into blocks of `block_size` tokens.

    Each block: input_ids, labels, position_ids. Positions restart at 0 where a document (or its
    continuation in a new block) starts, so attention can be block-diagonal. Labels equal
    input_ids except -100 at each such start: a document's first token is not predicted from
    another document. Empty texts are skipped; the last, partial block is kept.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive (got {block_size})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token, needed to separate documents in the packed corpus")
    ids: list[int] = []
    positions: list[int] = []
    texts = iter(texts)
    while chunk := list(islice(texts, DOCS_PER_BATCH)):
        for doc in encode_texts(tokenizer, [t for t in chunk if t]):
            doc.append(eos)
            taken = 0
            while taken < len(doc):
                take = min(block_size - len(ids), len(doc) - taken)
                ids.extend(doc[taken : taken + take])
                positions.extend(range(take))
                taken += take
                if len(ids) == block_size:
                    yield _text_block(ids, positions)
                    ids, positions = [], []
    if ids:
        yield _text_block(ids, positions)


def _text_block(ids: list[int], positions: list[int]) -> dict:
    labels = [IGNORE if p == 0 else t for t, p in zip(ids, positions)]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _labels(example: dict) -> list[int]:
    labels = example.get("labels")
    return list(example["input_ids"] if labels is None else labels)


def flatten_batch(
    examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row of shape (1, total): input_ids, labels, position_ids.

    Position ids restart at 0 per example, and each example's first label is -100 so no token is
    predicted from the previous example. With `pad_to_multiple_of`, a tail of `pad_token_id`
    (labels -100, positions from 0, i.e. its own segment) rounds the length up.
    """
    import torch  # here, not at the top: the tokenize workers import this module and never build batches

    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        ids = list(example["input_ids"])
        lab = _labels(example)
        if len(lab) != len(ids):
            raise ValueError(f"an example has {len(ids)} input_ids but {len(lab)} labels")
        if lab:
            lab[0] = IGNORE
        input_ids += ids
        labels += lab
        positions += range(len(ids))
    if pad_to_multiple_of and len(input_ids) % pad_to_multiple_of:
        pad = pad_to_multiple_of - len(input_ids) % pad_to_multiple_of
        input_ids += [pad_token_id] * pad
        labels += [IGNORE] * pad
        positions += range(pad)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def pad_causal(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example and send no attention mask: the fastest batch on CPUs.

    Under causal attention a real token never attends to the pads after it, so the mask is not needed
    and the kernel takes its plain causal path; pad positions carry label -100 and are never projected
    by the LM head. Pair it with length-grouped sampling so little is padded. Rows that carry
    `position_ids` (documents packed into a block) keep them, so attention stays within documents.
    """
    import torch

    if not examples:
        raise ValueError("pad_causal needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    with_positions = all(e.get("position_ids") is not None for e in examples)
    positions = torch.zeros((len(examples), width), dtype=torch.long) if with_positions else None
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(list(example["input_ids"]), dtype=torch.long)
        labels[row, :n] = torch.as_tensor(_labels(example), dtype=torch.long)
        if positions is not None:
            positions[row, :n] = torch.as_tensor(list(example["position_ids"]), dtype=torch.long)
            positions[row, n:] = torch.arange(width - n)  # the pad tail is a segment of its own
    batch = {"input_ids": input_ids, "labels": labels,
             "num_real_tokens": torch.tensor(sum(len(e["input_ids"]) for e in examples))}
    if positions is not None:
        batch["position_ids"] = positions
    return batch
