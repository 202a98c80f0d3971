"""Batching tokenized examples: padding-free packing (the default) and classic right padding.

Padding-free batches put several examples in one row with position ids restarting per example,
so attention kernels that read position ids (flash-attention varlen, or a block-diagonal mask
built from them) keep examples apart and no compute is spent on pad tokens.
"""

from __future__ import annotations

import torch

IGNORE = -100


def pack_sequences(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most `capacity` tokens, first-fit decreasing.

    An example longer than `capacity` gets a bin of its own (truncation is the tokenizer's job).
    Bins come out in creation order, so the longest examples lead.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive (got {capacity})")
    bins: list[list[int]] = []
    free: list[int] = []  # remaining room per bin
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length < 0:
            raise ValueError(f"example {index} has negative length {length}")
        for b, room in enumerate(free):
            if length <= room:
                bins[b].append(index)
                free[b] -= length
                break
        else:
            bins.append([index])
            free.append(capacity - length)  # negative for an oversized example: nothing joins it
    return bins


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


def pad_batch(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest (rounded up to `pad_to_multiple_of`): input_ids, attention_mask, labels."""
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of and width % pad_to_multiple_of:
        width += pad_to_multiple_of - width % pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(list(example["input_ids"]), dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(_labels(example), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_causal(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example and send no attention mask: the fastest batch on CPUs.

    Under causal attention a real token never attends to the pads after it, so the mask is not needed
    and the kernel takes its plain causal path; pad positions carry label -100 and are never projected
    by the LM head. Pair it with length-grouped sampling so little is padded. Rows that carry
    `position_ids` (documents packed into a block) keep them, so attention stays within documents.
    """
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
