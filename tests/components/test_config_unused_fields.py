"""Every alignment method x every field of AlignmentConfig (and the reward stage x RewardModelConfig): a field
set away from its default is either refused, naming the field and the method, or read by that method.

"Read" is proven on what the stage builds from the config, without loading a model: the TRL config object
(preference methods, GRPO), the PPOSettings that stage._run_ppo hands run_ppo, the peft LoraConfig,
the bitsandbytes config and the freeze selection of methods.prepare_trainable, the divergence guard. A few
fields are read straight by a loop that cannot run without a model (RAFT's loop, the stage's prompt limit):
for those the test checks the source reads that field (READ_IN_SOURCE).
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ValidationError

from components.config import AlignmentConfig, RewardModelConfig
from components.config_alignment import ALIGNMENT_FIELDS, METHOD_BETA, METHOD_NAMED, REWARD_FIELDS, _covers
from components.models.loading import select_hardware

CPU = select_hardware("cpu", "fp32")

# A non-default value for the fields whose type does not give one.
VALUES = {
    "beta": 0.3, "max_kl": 5.0, "lora.loraplus_lr_ratio": 16.0, "raft.reward_threshold": 0.5,
    "reward.rule": "components.alignment.icd10:icd10_reward", "reward.http_url": "http://localhost:9/reward",
    "lora.target_modules": ["q_proj", "v_proj"], "freeze.trainable_modules": ["lm_head"],
    "galore.target_modules": ["mlp"], "ppo.value_learning_rate": 3e-4, "missing_eos_penalty": 1.0,
}
# What a field needs beside it to be read at all (AlignmentConfig refuses it otherwise, naming that setting).
CONTEXT = {"freeze.": {"finetuning": "freeze"}, "qlora.": {"finetuning": "qlora"},
           "galore.": {"optimizer": "galore_adamw", "finetuning": "full"}}


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted name, default, annotation) of every field, nested sections included."""
    out = []
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            out += _leaves(type(default), f"{prefix}{name}.")
        else:
            out.append((prefix + name, default, info.annotation))
    return out


def _other_value(field: str, default, annotation):
    if field in VALUES and VALUES[field] != default:
        return VALUES[field]
    if field == "enabled":
        return False if default is True else True
    literal = [a for a in typing.get_args(annotation) if typing.get_origin(a) is typing.Literal] or [annotation]
    if typing.get_origin(literal[0]) is typing.Literal:
        return next(v for v in typing.get_args(literal[0]) if v != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default > 0 else 0.5
    raise AssertionError(f"no non-default value for {field} (default {default!r}): add it to VALUES")


def _nested(field: str, value) -> dict:
    head, _, rest = field.partition(".")
    return {head: _nested(rest, value)} if rest else {head: value}


def _context(field: str) -> dict:
    return next((c for prefix, c in CONTEXT.items() if field.startswith(prefix)), {})


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _get(obj, field: str):
    for part in field.split("."):
        obj = getattr(obj, part)
    return obj


ALIGNMENT_LEAVES = _leaves(AlignmentConfig)
METHODS = sorted(ALIGNMENT_FIELDS)
PAIRS = [(m, f, d, a) for m in METHODS for f, d, a in ALIGNMENT_LEAVES if f != "method"]


# --------------------------------------------------------------------------- what each method builds

def _trl_config(method: str, cfg, tmp_path: Path):
    from components.alignment.trl_methods import grpo_config, preference_trainer
    from components.alignment.trl_support import common_args

    if method == "grpo":
        return grpo_config(cfg, CPU, tmp_path)
    return preference_trainer(method, cfg, common_args(cfg, CPU, tmp_path))[1]


def _ppo_settings(cfg, tmp_path: Path, monkeypatch):
    """The PPOSettings stage._run_ppo hands run_ppo (run_ppo replaced by a recorder)."""
    from components.alignment import stage
    from components.config import PipelineConfig
    from components.models import generation
    from components.training import ppo

    seen = {}

    def record(model, tokenizer, rows, settings, out_dir, **kwargs):
        seen["settings"], seen["kwargs"] = settings, kwargs
        (out_dir / "ppo_curve.json").write_text('{"steps": []}')
        return {}

    monkeypatch.setattr(ppo, "run_ppo", record)
    monkeypatch.setattr(stage, "turn_end", lambda tokenizer, template: "")
    monkeypatch.setattr(generation, "stop_ids", lambda tokenizer, template: [])
    pipeline = PipelineConfig(alignment=cfg)
    stage._run_ppo(None, None, [], None, Path("reward-adapter"), pipeline, tmp_path, None)
    return seen["settings"], seen["kwargs"]


class _Decoder(torch.nn.Module):
    """Enough of a causal LM for methods.prepare_trainable's full and freeze paths."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {})()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        self.lm_head = torch.nn.Linear(2, 2)


def _trainable(cfg) -> set[str]:
    from components.training.methods import prepare_trainable

    model = prepare_trainable(_Decoder(), cfg, CPU)
    return {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}


PPO_NAMES = {"max_steps": "steps", "lora.r": "lora_r", "lora.alpha": "lora_alpha",
             "lora.target_modules": "lora_target_modules", "lora.use_rslora": "lora_use_rslora",
             "lora.use_dora": "lora_use_dora"}
TRAINER_NAMES = {"batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
                 "use_liger": "use_liger_kernel", "gradient_checkpointing": "activation_checkpointing",
                 "max_new_tokens": "max_completion_length"}
LORA_NAMES = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora",
              "use_dora": "use_dora"}
# Read by code that needs a model to run: (file, the text that reads the field).
READ_IN_SOURCE = {
    "max_prompts": ("components/alignment/stage.py", "limit=acfg.max_prompts"),
    "lora.train_new_tokens": ("components/training/methods.py", "cfg.lora.train_new_tokens"),
}
RAFT_SOURCE = "components/alignment/raft.py"


def _source(path: str) -> str:
    return (Path(__file__).resolve().parents[2] / path).read_text()


def _assert_read(method: str, field: str, value, cfg, tmp_path: Path, monkeypatch) -> None:
    """`field`'s `value` reaches what `method` builds from `cfg`."""
    from components.alignment.trl_support import stage_callback
    from components.errors import TrainingDiverged
    from components.training.methods import lora_config, qlora_quantization

    if field.startswith("reward."):  # the reward every sampling method scores with, and the evaluation's rule
        assert "build_reward(acfg.reward" in _source("components/alignment/stage.py")
        assert "cfg.alignment.reward" in _source("components/pipeline.py")
        return
    if field in READ_IN_SOURCE:
        path, text = READ_IN_SOURCE[field]
        assert text in _source(path), (field, path)
        return
    if field.startswith("lora.") and method != "ppo":
        lora = lora_config(cfg.lora)
        sub = field.split(".", 1)[1]
        if sub == "target_modules":
            assert set(lora.target_modules) == set(value)
        elif sub == "init":
            assert lora.init_lora_weights == value
        else:
            assert getattr(lora, LORA_NAMES[sub]) == value, field
        return
    if field.startswith("qlora."):
        bnb = qlora_quantization(cfg.qlora, CPU)
        got = {"quant_type": bnb.bnb_4bit_quant_type, "double_quant": bnb.bnb_4bit_use_double_quant,
               "compute_dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
                   bnb.bnb_4bit_compute_dtype]}[field.split(".")[1]]
        assert got == value, field
        return
    if field == "freeze.trainable_layers":
        assert _trainable(cfg) == {f"layers.{i}" for i in range(4 - value, 4)}
        return
    if field == "freeze.trainable_modules":
        assert {"lm_head", "layers.2", "layers.3"} == _trainable(cfg)
        return
    if field == "finetuning":
        assert value == "full" and _trainable(cfg) == {"layers.0", "layers.1", "layers.2", "layers.3", "lm_head"}
        return
    if field == "max_kl" and method != "ppo":  # the guard every TRL method's callback runs
        assert "max_kl=cfg.max_kl" in _source("components/alignment/trl_methods.py")
        guard = stage_callback(None, max_kl=cfg.max_kl)
        state = type("State", (), {"global_step": 3, "max_steps": 10, "is_world_process_zero": True})()
        args = type("Args", (), {"fp16": False, "logging_steps": 1})()
        with pytest.raises(TrainingDiverged):
            guard.on_log(args, state, None, logs={"kl": value * 2})
        return

    if method == "ppo":
        _assert_ppo_reads(field, value, cfg, tmp_path, monkeypatch)
        return
    if method == "raft":
        text = _source(RAFT_SOURCE)
        name = field.split(".")[-1]
        assert (f"cfg.{field}" in text) or (field.startswith("raft.") and f"raft.{name}" in text), field
        return

    _assert_trl_reads(method, field, value, cfg, tmp_path)


def _assert_ppo_reads(field: str, value, cfg, tmp_path: Path, monkeypatch) -> None:
    """The field reaches PPOSettings, and a LoRA field the adapter build_policy_model makes."""
    settings, _ = _ppo_settings(cfg, tmp_path, monkeypatch)
    name = PPO_NAMES.get(field, field.split(".")[-1])
    assert getattr(settings, name) == value, (field, getattr(settings, name))
    if field.startswith("lora."):  # and on into the adapter build_policy_model makes
        import peft

        from components.training.ppo_rollout import build_policy_model

        monkeypatch.setattr(peft, "get_peft_model", lambda model, config, adapter_name: config)
        lora = build_policy_model(None, settings)
        sub = field.split(".")[1]
        got = set(lora.target_modules) if sub == "target_modules" else getattr(lora, LORA_NAMES[sub])
        assert got == (set(value) if sub == "target_modules" else value), field


def _assert_trl_reads(method: str, field: str, value, cfg, tmp_path: Path) -> None:
    """The field reaches the TRL method's config (TrainingArguments and the method's own)."""
    from components.training.lora import warmup_steps
    from components.training.methods import OPTIMIZERS

    args = _trl_config(method, cfg, tmp_path)
    if field == "optimizer":
        assert args.optim == OPTIMIZERS[value]
    elif field == "lr_scheduler":
        assert args.lr_scheduler_type == value
    elif field == "warmup_ratio":
        assert args.warmup_steps == warmup_steps(value, cfg.max_steps) > 0
    elif field.startswith("galore."):
        sub = field.split(".")[1]
        assert (args.optim_target_modules == value) if sub == "target_modules" else (f"{sub}={value}" in
                                                                                     args.optim_args)
    elif field in ("batch_size", "grad_accum") and method == "grpo":  # a step samples batch_size x grad_accum
        # prompts x num_generations, and takes the gradient one prompt's group at a time (trl_methods.grpo_config)
        assert args.generation_batch_size == cfg.batch_size * cfg.grad_accum * cfg.num_generations
        assert args.gradient_accumulation_steps == cfg.batch_size * cfg.grad_accum
    else:
        assert getattr(args, TRAINER_NAMES.get(field, field)) == value, field


# --------------------------------------------------------------------------- the walk

@pytest.mark.parametrize(("method", "field", "default", "annotation"), PAIRS,
                         ids=[f"{m}-{f}" for m, f, _, _ in PAIRS])
def test_every_alignment_field_is_read_or_refused(method, field, default, annotation, tmp_path, monkeypatch):
    value = _other_value(field, default, annotation)
    data = _merge({"method": method}, _nested(field, value))
    if _covers(ALIGNMENT_FIELDS[method], field):
        cfg = AlignmentConfig.model_validate(_merge(data, _context(field)))
        assert _get(cfg, field) == value
        _assert_read(method, field, value, cfg, tmp_path, monkeypatch)
    elif _covers(frozenset(METHOD_NAMED), field):  # named for another method: kept for switching back
        owner = next(m for k, m in METHOD_NAMED.items() if _covers(frozenset({k}), field))
        assert owner != method and _covers(ALIGNMENT_FIELDS[owner], field)
        AlignmentConfig.model_validate(data)
    else:
        with pytest.raises(ValidationError) as err:
            AlignmentConfig.model_validate(data)
        message = str(err.value)
        assert f"alignment.{field}" in message and f"method={method}" in message, message


REWARD_LEAVES = [(f, d, a) for f, d, a in _leaves(RewardModelConfig)]


@pytest.mark.parametrize(("field", "default", "annotation"), REWARD_LEAVES, ids=[f for f, _, _ in REWARD_LEAVES])
def test_every_reward_field_is_read_or_refused(field, default, annotation, tmp_path):
    from components.alignment.trl_support import common_args
    from components.training.methods import lora_config

    value = _other_value(field, default, annotation)
    data = _nested(field, value)
    if not _covers(REWARD_FIELDS, field):
        with pytest.raises(ValidationError) as err:
            RewardModelConfig.model_validate(data)
        assert f"reward.{field}" in str(err.value) and "reward stage" in str(err.value), str(err.value)
        return
    cfg = RewardModelConfig.model_validate(_merge(data, _context(field)))
    assert _get(cfg, field) == value
    source = _source("components/alignment/reward_model.py")
    if field.startswith("lora."):
        lora = lora_config(cfg.lora, "SEQ_CLS")
        sub = field.split(".")[1]
        got = set(lora.target_modules) if sub == "target_modules" else getattr(lora, LORA_NAMES[sub])
        assert got == (set(value) if sub == "target_modules" else value)
        assert "lora_config(cfg.lora" in source
    elif field in ("enabled",):
        from components.config import PipelineConfig
        from components.pipeline import needs_reward_model

        assert needs_reward_model(PipelineConfig(reward=cfg)) is value
    elif field in ("max_length", "min_accuracy", "on_low_accuracy"):
        assert f"rcfg.{field}" in _source("components/alignment/reward_model.py") or f"cfg.{field}" in source
    else:
        from trl import RewardConfig

        from components.training.methods import OPTIMIZERS

        assert "RewardConfig(**common_args(cfg" in source
        args = RewardConfig(**common_args(cfg, CPU, tmp_path))
        if field == "optimizer":
            assert args.optim == OPTIMIZERS[value]
        elif field == "lr_scheduler":
            assert args.lr_scheduler_type == value
        elif field == "warmup_ratio":
            assert args.warmup_steps > 0
        elif field.startswith("galore."):
            sub = field.split(".")[1]
            assert (args.optim_target_modules == value if sub == "target_modules"
                    else f"{sub}={value}" in args.optim_args)
        else:
            assert getattr(args, TRAINER_NAMES.get(field, field)) == value, field


def test_the_table_names_only_real_fields():
    fields = {f for f, _, _ in ALIGNMENT_LEAVES}
    for method, used in ALIGNMENT_FIELDS.items():
        for name in used:
            assert name in fields or any(f.startswith(name[:-1]) for f in fields if name.endswith(".*")), (method, name)
    reward = {f for f, _, _ in REWARD_LEAVES}
    assert all(n in reward or n.endswith(".*") for n in REWARD_FIELDS)


# --------------------------------------------------------------------------- one meaning per name

@pytest.mark.parametrize("method", sorted(METHOD_BETA))
def test_a_null_beta_is_the_methods_own_and_reaches_its_trl_config(method, tmp_path):
    data = {"method": method}
    cfg = AlignmentConfig.model_validate(data)
    assert cfg.beta is None and cfg.method_beta == METHOD_BETA[method]
    assert _trl_config(method, cfg, tmp_path).beta == METHOD_BETA[method]
    assert _trl_config(method, cfg.model_copy(update={"beta": 0.7}), tmp_path).beta == 0.7


def test_grpo_refuses_a_kl_bound_it_cannot_measure():
    with pytest.raises(ValidationError, match="beta 0 loads no reference"):
        AlignmentConfig(method="grpo", beta=0, max_kl=1.0)
    AlignmentConfig(method="grpo", max_kl=1.0)  # beta null: 0.04, KL logged


def test_method_none_reads_nothing_and_refuses_nothing():
    cfg = AlignmentConfig(method="none", max_steps=3, num_generations=9, lora={"use_dora": True})
    assert (cfg.max_steps, cfg.num_generations, cfg.lora.use_dora) == (3, 9, True)  # kept as written, not refused


def test_the_docs_list_every_refused_field_per_method():
    """docs/alignment.md's "What each method reads" table lists, per method, every field the method refuses."""
    import re

    text = _source("docs/alignment.md")
    rows = {}
    start = text.index("## What each method reads")
    for line in text[start:text.index("\n## ", start)].splitlines():
        cells = line.split("|")
        if len(cells) > 3 and "`" in cells[1]:
            for name in re.findall(r"`([^`]+)`", cells[1]):
                rows[name] = set(re.findall(r"`([^`]+)`", cells[2]))
        elif line.startswith("| reward stage"):
            rows["reward"] = set(re.findall(r"`([^`]+)`", cells[2]))
    listed = lambda method, field: field in rows[method] or f"{field.split('.')[0]}.*" in rows[method]  # noqa: E731
    for method in METHODS:
        for field, _, _ in ALIGNMENT_LEAVES:
            if field == "method" or _covers(ALIGNMENT_FIELDS[method], field) or _covers(frozenset(METHOD_NAMED), field):
                continue
            assert listed(method, field), (method, field)
    for field, _, _ in REWARD_LEAVES:
        if not _covers(REWARD_FIELDS, field):
            assert listed("reward", field), field
