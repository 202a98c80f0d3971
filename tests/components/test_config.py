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


def _leaves(data, path=""):
    """Every leaf of a config dump as (dotted path, value)."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, f"{path}.{key}" if path else key)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, data


def _changed(a: PipelineConfig, b: PipelineConfig) -> set[str]:
    left, right = dict(_leaves(a.model_dump(mode="json"))), dict(_leaves(b.model_dump(mode="json")))
    return {k for k in left.keys() | right.keys() if left.get(k, "<absent>") != right.get(k, "<absent>")}


def test_builtin_defaults_do_not_speak_for_the_icd_demo():
    # The defaults are what a user's own config falls back to: no ICD dataset, system prompt or model name.
    defaults = dict(_leaves(load_config(None).model_dump(mode="json")))
    assert defaults["tokenize.system_prompt"] is None
    domain = {k: v for k, v in defaults.items() if any(w in str(v).lower() for w in ("icd", "medical"))}
    assert domain == {}


def test_a_config_naming_only_its_sft_data_reads_no_other_dataset(tmp_path):
    # A user's dataset_info.json holds only their own datasets: no group may fall back to the demo's names.
    p = tmp_path / "mine.yaml"
    p.write_text("data:\n  dataset_info: my/dataset_info.json\n  sft: [my_chats]\n")
    data = load_config(p).data
    assert data.sft == ["my_chats"]
    others = {g: getattr(data, g) for g in ("cpt", "cpt_eval", "sft_eval", "preference", "preference_eval", "kto",
                                            "prompts")}
    assert others == dict.fromkeys(others, [])


def test_demo_preset_keeps_its_own_system_prompt():
    """An empty system turn, not none: null would let SmolLM's template add its default 16-token one."""
    demo = load_config(ROOT / "configs/demo-cpu.yaml")
    assert demo.tokenize.system_prompt == "" and demo.tokenize.system_prompt is not None


def test_overrides_apply_field_by_field_on_top_of_the_file():
    path = ROOT / "configs/demo-cpu.yaml"
    demo = load_config(path)
    changed = load_config(path, ["sft.max_steps=7", "sft.lora.r=4", "tokenize.system_prompt=null"])
    assert _changed(demo, changed) == {"sft.max_steps", "sft.lora.r", "tokenize.system_prompt"}
    assert (changed.sft.max_steps, changed.sft.lora.r, changed.tokenize.system_prompt) == (7, 4, None)
    # Siblings keep the file's values, not the built-in defaults: the section is not replaced.
    assert changed.sft.learning_rate == demo.sft.learning_rate == 1e-3 != PipelineConfig().sft.learning_rate
    assert changed.sft.lora.alpha == demo.sft.lora.alpha


def test_file_values_apply_field_by_field_on_top_of_the_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  max_steps: 3\n  lora: {r: 2}\n")
    assert _changed(PipelineConfig(), load_config(p)) == {"sft.max_steps", "sft.lora.r"}


def test_override_parses_types():
    cfg = load_config(None, ["sft.learning_rate=1e-4", "cpt.enabled=false", "quantize.methods=[nf4]", "data.max_samples=10"])
    assert cfg.sft.learning_rate == 1e-4
    assert cfg.cpt.enabled is False
    assert cfg.quantize.methods == ["nf4"]
    assert cfg.data.max_samples == 10


def test_sft_task_weights_parse_from_the_command_line_and_refuse_negatives():
    cfg = load_config(None, ["data.sft_task_weights={code_to_chapter: 3, description_to_code: 0.5}"])
    assert cfg.data.sft_task_weights == {"code_to_chapter": 3.0, "description_to_code": 0.5}
    with pytest.raises(ConfigError, match=r"data\.sft_task_weights\.billable"):
        load_config(None, ["data.sft_task_weights={billable: -1}"])


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


@pytest.mark.parametrize(("sets", "message"), [
    (["alignment.method=ppo", "alignment.optimizer=lion"], "steps its own AdamW: set alignment.optimizer to adamw"),
    (["alignment.method=raft", "alignment.grad_accum=4"], "set alignment.grad_accum to 1 .* raise alignment.batch_size"),
    (["alignment.method=ppo", "alignment.grad_accum=2"], "raise alignment.ppo.mini_batch_size"),
    (["alignment.method=dpo", "alignment.deepspeed.stage=2"], "alignment stage trains in one process without DeepSpeed"),
    (["reward.deepspeed.stage=3"], "reward stage trains in one process without DeepSpeed"),
])
def test_settings_a_training_loop_would_ignore_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)
    # What these loops do honour is accepted.
    load_config(None, ["alignment.method=raft", "alignment.lr_scheduler=linear", "alignment.weight_decay=0.1"])


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_a_billion_laughs_config_is_refused_before_it_expands(tmp_path, monkeypatch):
    import yaml

    def constructed(*_args, **_kwargs):
        raise AssertionError("a node was constructed: the aliases were expanded")

    # Refused while composing: no node of the 9**9-element list is ever constructed.
    monkeypatch.setattr(yaml.constructor.SafeConstructor, "construct_document", constructed)
    p = tmp_path / "laughs.yaml"
    p.write_text(BILLION_LAUGHS)
    with pytest.raises(ConfigError, match=rf"config file {p}, line 1: anchor '&a': lmforge configs may not use "
                                          "YAML anchors or aliases .* write the values out in full"):
        load_config(p)


def test_aliases_are_refused_with_their_line_in_files_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  max_steps: 3\ncpt: *other\n")
    with pytest.raises(ConfigError, match=rf"config file {p}, line 3: alias '\*other'"):
        load_config(p)
    p.write_text("sft:\n  <<: *base\n")  # a merge key is an alias too
    with pytest.raises(ConfigError, match=r"line 2: alias '\*base'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"override 'data.sft=\[\*x\]', line 1: alias '\*x'"):
        load_config(None, ["data.sft=[*x]"])
    with pytest.raises(ConfigError, match=r"override 'data.sft=\[a' is not valid YAML"):
        load_config(None, ["data.sft=[a"])


def test_ppo_refuses_a_nucleus_it_would_not_score():
    # PPO's ratio and KL use log-probabilities over the whole vocabulary: nucleus samples would be off-policy.
    from components.config import AlignmentConfig

    with pytest.raises(ValueError, match=r"alignment.top_p is 0.9, but alignment.method=ppo"):
        AlignmentConfig(method="ppo", top_p=0.9)
    assert AlignmentConfig(method="raft", top_p=0.9).top_p == 0.9
    assert AlignmentConfig(method="ppo", temperature=0.7).top_p == 1.0
