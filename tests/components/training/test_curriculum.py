"""data.sft_phases trains sft.parquet once, in order: the SFT stage refuses step counts that would cut or repeat it."""

from __future__ import annotations

import pytest

from components.config import ConfigError, TrainConfig
from components.training.sft import check_curriculum_steps


def test_the_steps_must_cover_the_rows_exactly_once():
    cfg = TrainConfig(max_steps=13, batch_size=4, grad_accum=2)
    check_curriculum_steps(100, cfg)  # 13 steps of 8 rows: the last step holds the last 4
    with pytest.raises(ConfigError, match=r"100 rows once, in order, at 8 rows a step .* sft\.max_steps=12 stops "
                                          r"before the last phase's rows\. Set sft\.max_steps=13"):
        check_curriculum_steps(100, cfg.model_copy(update={"max_steps": 12}))
    with pytest.raises(ConfigError, match=r"sft\.max_steps=14 would start over at the first phase"):
        check_curriculum_steps(100, cfg.model_copy(update={"max_steps": 14}))
    with pytest.raises(ConfigError, match=r"at 16 rows a step \(batch_size x grad_accum x GPUs\).*max_steps=7"):
        check_curriculum_steps(100, cfg, ranks=2)
