"""Packing and batching: no token lost or duplicated, examples kept apart, labels aligned."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.data.packing import IGNORE, flatten_batch

PAD = 0


examples = st.lists(
    st.lists(st.integers(min_value=1, max_value=999), min_size=1, max_size=20).flatmap(
        lambda ids: st.tuples(st.just(ids), st.lists(st.sampled_from([True, False]), min_size=len(ids), max_size=len(ids)))
    ),
    min_size=1,
    max_size=8,
)


def as_examples(drawn) -> list[dict]:
    return [{"input_ids": ids, "labels": [t if keep else IGNORE for t, keep in zip(ids, mask)]} for ids, mask in drawn]


@settings(max_examples=80)
@given(drawn=examples, multiple=st.sampled_from([None, 1, 8, 64]))
def test_flatten_batch_keeps_examples_apart(drawn, multiple):
    batch = flatten_batch(as_examples(drawn), PAD, pad_to_multiple_of=multiple)
    ids, labels, positions = (batch[k] for k in ("input_ids", "labels", "position_ids"))
    total = sum(len(i) for i, _ in drawn)
    assert ids.shape == labels.shape == positions.shape and ids.shape[0] == 1 and ids.dtype == torch.long
    if multiple:
        assert ids.shape[1] % multiple == 0
    ids, labels, positions = ids[0].tolist(), labels[0].tolist(), positions[0].tolist()
    assert ids[:total] == [t for i, _ in drawn for t in i]
    assert all(t == PAD for t in ids[total:]) and all(label == IGNORE for label in labels[total:])
    start = 0
    for example in as_examples(drawn):
        n = len(example["input_ids"])
        assert positions[start : start + n] == list(range(n))
        assert labels[start] == IGNORE  # never predicted from the previous example
        assert labels[start + 1 : start + n] == example["labels"][1:]
        start += n
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels))


def test_flatten_batch_defaults_labels_to_inputs():
    batch = flatten_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}], PAD)
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        flatten_batch([{"input_ids": [1, 2, 3], "labels": [1, 2]}], PAD)
