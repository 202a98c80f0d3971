"""The cpt and sft stages refuse to start without datasets of their own (the data groups start empty)."""

from __future__ import annotations

import pytest

from components.config import load_config
from components.errors import StageInputError
from components.pipeline import StageInputs
from components.training.sft import train_stage


@pytest.mark.parametrize(("kind", "what"), [("cpt", "plain-text"), ("sft", "instruction or conversation")])
def test_a_training_stage_with_no_datasets_says_which_group_to_fill(kind, what, tmp_path):
    cfg = load_config(None, [f"workspace={tmp_path}"])  # every data group empty
    with pytest.raises(StageInputError, match=rf"{kind} is enabled but data\.{kind} names no dataset: list your "
                                              rf"{what} datasets under data\.{kind}, or set {kind}\.enabled: false"):
        train_stage(cfg, StageInputs(node=kind, kind=kind, upstream={}), tmp_path / "out")
