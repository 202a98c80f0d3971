"""Activation checkpointing reaches TrainingArguments under the name the installed transformers has (5.17, on
the lent GPU machines, knows only `gradient_checkpointing`; later 5.x releases renamed it)."""

from __future__ import annotations

from components.training.lora import checkpointing_arguments


def test_the_setting_goes_under_the_name_this_transformers_has(monkeypatch):
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    expected = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    on = checkpointing_arguments(True, {"use_reentrant": False})
    assert on == {expected: True, f"{expected}_kwargs": {"use_reentrant": False}}
    assert checkpointing_arguments(False, {"use_reentrant": False})[f"{expected}_kwargs"] is None
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **on)
    assert getattr(args, expected) is True

    # An older transformers, without the new name: the old one is used.
    older = {k: v for k, v in fields.items() if not k.startswith("activation_checkpointing")}
    monkeypatch.setattr(TrainingArguments, "__dataclass_fields__", older)
    assert checkpointing_arguments(True, {}) == {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {}}
