"""A deployment run's config is the trigger's fields laid over the deployment's preset, field by field."""

from __future__ import annotations

from components.config import PipelineConfig, load_config
from flows.deployment_config import lay_over

ROOT_PRESET = "configs/demo-cpu.yaml"


def test_a_partial_config_changes_only_the_fields_it_names():
    preset = load_config(ROOT_PRESET).model_dump(mode="json")
    given = PipelineConfig.model_validate({"sft": {"learning_rate": 1e-4}, "data": {"cpt": ["other_corpus"]}})
    merged = PipelineConfig.model_validate(lay_over(preset, given))
    assert merged.sft.learning_rate == 1e-4
    assert merged.data.cpt == ["other_corpus"]  # a list is a value: replaced, not merged
    # Everything else is the preset's, not the built-in default's.
    assert merged.sft.max_steps == preset["sft"]["max_steps"] != PipelineConfig().sft.max_steps
    expected = preset | {"sft": preset["sft"] | {"learning_rate": 1e-4}, "data": preset["data"] | {"cpt": ["other_corpus"]}}
    assert merged.model_dump(mode="json") == expected


def test_a_full_config_runs_as_given_and_an_empty_one_is_the_preset():
    preset = load_config(ROOT_PRESET).model_dump(mode="json")
    full = PipelineConfig.model_validate(preset | {"workspace": "elsewhere"})  # what the UI form submits
    assert lay_over(preset, full) == full.model_dump(mode="json")
    assert lay_over(preset, PipelineConfig()) == preset  # a run that set nothing
    # A field set to its default value is still a choice the trigger made.
    default_lr = PipelineConfig().sft.learning_rate
    assert lay_over(preset, PipelineConfig.model_validate({"sft": {"learning_rate": default_lr}}))["sft"]["learning_rate"] == default_lr


def test_a_triggered_run_cannot_turn_on_remote_code_unless_the_deployment_allows_it():
    import pytest

    from flows.deployment_config import RemoteCodeRefused, check_remote_code

    preset = load_config(ROOT_PRESET).model_dump(mode="json")
    asks = PipelineConfig.model_validate({"model": {"trust_remote_code": True}})
    merged = PipelineConfig.model_validate(lay_over(preset, asks))
    with pytest.raises(RemoteCodeRefused, match="deployment does not allow it"):
        check_remote_code(preset, merged)
    allowing = preset | {"model": preset["model"] | {"trust_remote_code": True}}
    check_remote_code(allowing, merged)  # the deployment's own preset allows it: runs
    check_remote_code(preset, PipelineConfig.model_validate(preset))  # off stays fine
