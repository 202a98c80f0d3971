from pathlib import Path

import pytest

from components.config import ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert path.read_text().splitlines()[0] == f"# lmforge run configs/{path.name}"
    assert Path(ROOT / cfg.data.dataset_info).is_file()


def test_defaults_are_the_cpu_demo():
    assert load_config(None).model_dump() == PipelineConfig().model_dump()


def test_override_parses_types():
    cfg = load_config(None, ["sft.learning_rate=1e-4", "cpt.enabled=false", "quantize.methods=[nf4]", "data.max_samples=10"])
    assert cfg.sft.learning_rate == 1e-4
    assert cfg.cpt.enabled is False
    assert cfg.quantize.methods == ["nf4"]
    assert cfg.data.max_samples == 10


def test_unknown_key_fails_naming_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"sft\.learning_rat: unknown key"):
        load_config(p)


def test_wrong_type_fails_naming_the_field():
    with pytest.raises(ConfigError, match=r"sft\.max_steps"):
        load_config(None, ["sft.max_steps=lots"])


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["sft.learning_rate"])


def test_digest_changes_with_any_field():
    a = load_config(None)
    b = load_config(None, ["sft.learning_rate=1e-3"])
    assert a.digest() != b.digest()
    assert a.digest() == load_config(None).digest()


def test_tracking_uri_defaults_to_sqlite_in_workspace(tmp_path):
    cfg = load_config(None, [f"workspace={tmp_path}"])
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


@pytest.mark.parametrize(("sets", "message"), [
    (["data.interleave_probs=[0.5,0.5]", "data.sft=[a,b]"], "needs mix_strategy interleave_under or interleave_over"),
    (["data.mix_strategy=interleave_under", "data.sft=[a,b]", "data.interleave_probs=[0.6,0.6]"], "must sum to 1"),
    (["data.mix_strategy=interleave_over", "data.sft=[a,b]", "data.interleave_probs=[1.0,0.0]"], "must be > 0"),
    (["data.mix_strategy=interleave_under", "data.sft=[a,b,c]", "data.interleave_probs=[0.5,0.5]"],
     r"has 2 entries but data.sft lists 3 datasets \(a, b, c\)"),
    (["data.mix_strategy=interleave_under", "data.interleave_probs=[1.0]"], "no training group .* more than one"),
    (["data.mix_strategy=shuffle"], "'concat', 'interleave_under' or 'interleave_over'"),
])
def test_bad_mixing_options_fail_naming_the_field(sets, message):
    with pytest.raises(ConfigError, match=rf"data\.(interleave_probs|mix_strategy): .*{message}"):
        load_config(None, sets)


def test_mixing_options_validate():
    cfg = load_config(None, ["data.mix_strategy=interleave_over", "data.sft=[icd10_instructions,identity]",
                             "data.interleave_probs=[0.9,0.1]", "data.identity_name=Coder"])
    assert cfg.data.interleave_probs == [0.9, 0.1] and cfg.data.identity_name == "Coder"
