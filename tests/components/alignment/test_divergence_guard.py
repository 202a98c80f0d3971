"""The TRL stages' divergence guard stops at the step that went wrong: a NaN loss, a NaN gradient norm
(Trainer logs a NaN loss as the previous mean, so the norm is what shows it), or KL beyond max_kl."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from components.alignment.trl_support import divergence_guard
from components.errors import TrainingDiverged

STATE = SimpleNamespace(global_step=7)
FP32 = SimpleNamespace(fp16=False, logging_steps=1)


@pytest.mark.parametrize("logs, what", [
    ({"loss": float("nan"), "grad_norm": 1.0}, "loss is nan"),
    ({"loss": 0.7, "grad_norm": float("inf")}, "grad_norm is inf"),
    ({"loss": 0.7, "grad_norm": 1.0, "objective/kl": 9.5}, "KL to the reference 9.500 > max_kl 8.0"),
])
def test_guard_names_the_step_and_the_cause(logs, what):
    with pytest.raises(TrainingDiverged) as err:
        divergence_guard(8.0, ("kl", "objective/kl"))(FP32, STATE, logs)
    assert err.value.step == 7 and what in str(err.value)


def test_guard_lets_healthy_steps_and_fp16_overflow_skips_through():
    guard = divergence_guard(8.0)
    passed = []
    for run_guard, args, logs in [
        (guard, FP32, {"loss": 0.7, "grad_norm": 1.0, "kl": 7.9}),
        (guard, SimpleNamespace(fp16=True, logging_steps=1), {"loss": 0.7, "grad_norm": float("inf")}),
        (divergence_guard(None), FP32, {"loss": 0.7, "kl": 1e6}),  # no bound set
    ]:
        run_guard(args, STATE, logs)  # raises TrainingDiverged if it wrongly stops
        passed.append(logs)
    assert len(passed) == 3
