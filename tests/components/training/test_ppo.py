"""PPO with one shared model (components/training/ppo.py, ppo_rollout.py) on 2-layer random Llamas.

The EOS cut and the settings' checks (the PPO math itself is in test_ppo_core.py); the roles on the shared
model (reference = adapter-free base, reward adapter = the standalone classifier, adapter switches leave
flags alone); then the loop: a toy reward goes up, the reward adapter stays frozen, a crash resumes to the
same result, and the divergence guards raise after keeping the last good state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from components.training import ppo, ppo_rollout
from components.training.ppo import (
    AlignmentDiverged,
    PPOSettings,
    attach_reward_adapter,
    build_policy_model,
    generate,
    left_pad,
    reference_policy,
    response_forward,
    reward_adapter_scores,
    run_ppo,
    use_adapter,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: threads only add contention on the shared 2-core machines.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def _small_prompts(n: int = 8) -> list[dict]:
    return [{"prompt": " ".join(f"w{(i * 7 + j) % 45}" for j in range(4)), "row_id": i} for i in range(n)]


def _count_reward(target_id: int):
    def reward(prompts, completions, completion_ids, **row):
        assert len(row["row_id"]) == len(prompts) == len(completions)
        return [float(sum(t == target_id for t in ids)) for ids in completion_ids]

    return reward


def _toy_settings(**overrides) -> PPOSettings:
    base = dict(steps=12, batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=8,
                kl_coef=0.05, save_steps=100, seed=0)
    return PPOSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def reward_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """What the reward stage saves (PEFT SEQ_CLS LoRA + score head), with non-zero weights, nothing trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS",
                        modules_to_save=["score"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "score" in n and "modules_to_save" in n:
                p.normal_(0, 1.0)
    out = tmp_path_factory.mktemp("reward") / "reward_adapter"
    peft_model.save_pretrained(out)
    return out


def _standalone_scores(tiny_model_dir, adapter_dir, rows: list[list[int]]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return torch.tensor([float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in rows])


def _randomize_policy(peft_model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".policy." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------- rollout pieces

def test_rollouts_stop_at_any_stop_token_and_are_right_padded_after_it(tiny_model_dir):
    # One stop rule: PPO samples through components.models.generation like RAFT and evaluation, so the
    # template's end of turn (given with the EOS ids) ends a response as it ends theirs.
    model, tok = _load(tiny_model_dir)
    query, query_mask = left_pad([tok("Which ICD-10-CM chapter contains", add_special_tokens=False)["input_ids"],
                                  tok("A00", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    settings = PPOSettings(max_new_tokens=6, temperature=1.0)
    torch.manual_seed(0)
    free, free_mask = ppo_rollout.generate(model, query, query_mask, settings, eos_ids=set(), pad_token_id=tok.pad_token_id)
    assert free_mask.tolist() == [[1] * 6, [1] * 6]
    stop = int(free[0, 2])  # a token the first response sampled third: now it ends that response there
    torch.manual_seed(0)
    cut, mask = ppo_rollout.generate(model, query, query_mask, settings, eos_ids={stop}, pad_token_id=tok.pad_token_id)
    first = free[0].tolist()[: free[0].tolist().index(stop) + 1]
    assert cut[0, : len(first)].tolist() == first and mask[0].tolist() == [1] * len(first) + [0] * (cut.shape[1] - len(first))
    assert all(t == tok.pad_token_id for t in cut[0, len(first):].tolist())


def test_settings_reject_what_ppo_cannot_do():
    with pytest.raises(ValueError, match="temperature"):
        PPOSettings(temperature=0)
    with pytest.raises(ValueError, match="max_kl"):
        PPOSettings(max_kl=0)


# ---------------------------------------------------------------- roles on one model

def test_reward_adapter_scores_equal_the_standalone_classifier(tiny_model_dir, reward_adapter_dir):
    model, tok = _load(tiny_model_dir)
    peft_model = build_policy_model(model, PPOSettings(lora_r=4))
    _randomize_policy(peft_model)  # a policy that differs from the base must not leak into the reward
    reward = attach_reward_adapter(peft_model, reward_adapter_dir, pad_token_id=tok.pad_token_id)
    assert peft_model.active_adapter == "policy"
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if ".reward." in n)
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if ".policy." in n)

    texts = ["Which ICD-10-CM chapter contains code E11.9?", "A00 Cholera", "Is code J45 billable? Yes"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = left_pad(rows, tok.pad_token_id)
    with torch.no_grad():
        shared = reward_adapter_scores(peft_model, reward, ids, mask)
    expected = _standalone_scores(tiny_model_dir, reward_adapter_dir, rows)
    assert expected.abs().max() > 0.1
    assert torch.allclose(shared, expected, atol=1e-5), (shared, expected)


def test_reward_adapter_without_score_head_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = _load(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    shared = build_policy_model(_load(tiny_model_dir)[0], PPOSettings(lora_r=2))
    with pytest.raises(ValueError, match="score head"):
        attach_reward_adapter(shared, tmp_path)


def test_reference_policy_is_the_adapter_free_base(tiny_model_dir, reward_adapter_dir):
    model, tok = _load(tiny_model_dir)
    base, _ = _load(tiny_model_dir)
    peft_model = build_policy_model(model, PPOSettings(lora_r=4)).eval()
    attach_reward_adapter(peft_model, reward_adapter_dir)
    _randomize_policy(peft_model)
    query, query_mask = left_pad([tok("A00 Cholera", add_special_tokens=False)["input_ids"],
                                  tok("Is code", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    settings = PPOSettings(max_new_tokens=6, temperature=0.7)
    torch.manual_seed(0)
    response, response_mask = generate(peft_model, query, query_mask, settings, eos_ids={tok.eos_token_id},
                                       pad_token_id=tok.pad_token_id)
    with torch.no_grad(), reference_policy(peft_model):
        ref, _, _ = response_forward(peft_model, query, query_mask, response, response_mask, temperature=0.7)
        policy_off = peft_model(input_ids=query).logits
    with torch.no_grad():
        pol, _, _ = response_forward(peft_model, query, query_mask, response, response_mask, temperature=0.7)
        base_logits = base(input_ids=query).logits
    # Logits of the reference == logits of a separately loaded base model.
    assert torch.allclose(policy_off, base_logits, atol=1e-5)
    # And the reference logprobs == the base's, each row scored unpadded on its own.
    for i in range(len(query)):
        q = query[i][query_mask[i].bool()]
        r = response[i][response_mask[i].bool()]
        with torch.no_grad():
            logits = base(input_ids=torch.cat([q, r])[None]).logits[0, len(q) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, r[:, None])[:, 0]
        assert torch.allclose(ref[i, : len(r)], expected, atol=1e-5)
        assert ref[i, len(r):].abs().sum() == 0
    assert not torch.allclose(pol, ref, atol=1e-3)  # the policy adapter is really on outside the block
    assert peft_model.active_adapter == "policy"


def test_logprobs_match_the_sampler_on_left_padded_prompts(tiny_model_dir):
    """The recomputed logprobs (our position ids) equal what generate sampled from, padding or not."""
    model, tok = _load(tiny_model_dir)
    peft_model = build_policy_model(model, PPOSettings(lora_r=4)).eval()
    _randomize_policy(peft_model)
    query, query_mask = left_pad([tok("Which ICD-10-CM chapter contains", add_special_tokens=False)["input_ids"],
                                  tok("A00", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=5, min_new_tokens=5, pad_token_id=tok.pad_token_id,
                           return_dict_in_generate=True, output_logits=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = peft_model.generate(input_ids=query, attention_mask=query_mask, generation_config=gen)
    response = out.sequences[:, query.shape[1]:]
    sampled = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, response[..., None])[..., 0]
    with torch.no_grad():
        lp, _, _ = response_forward(peft_model, query, query_mask, response, torch.ones_like(response), temperature=1.0)
    assert torch.allclose(lp, sampled, atol=1e-4)


def test_use_adapter_restores_the_active_adapter_and_every_flag(tiny_model_dir, reward_adapter_dir):
    model, _ = _load(tiny_model_dir)
    peft_model = build_policy_model(model, PPOSettings(lora_r=4))
    attach_reward_adapter(peft_model, reward_adapter_dir)
    before = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with use_adapter(peft_model, "reward"):
        assert peft_model.active_adapter == "reward"
        # PEFT's set_adapter would have made the reward adapter trainable: it stays frozen.
        assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == before
        with reference_policy(peft_model):
            pass
        assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == before
    assert peft_model.active_adapter == "policy"
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == before
    with pytest.raises(RuntimeError), use_adapter(peft_model, "reward"):
        raise RuntimeError("inside")
    assert peft_model.active_adapter == "policy"
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == before


# ---------------------------------------------------------------- the loop

def test_ppo_raises_a_toy_reward_and_writes_a_plain_adapter(small_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model, tok = _load(small_model_dir)
    target = tok.convert_tokens_to_ids("w7")
    logged: list[tuple[int, dict]] = []
    # 16 steps at 2e-2 raise the count by 2.3-5.4 over seeds 0-2 (12 at 1e-2 only by 0-1: seed luck).
    metrics = run_ppo(model, tok, _small_prompts(), _toy_settings(steps=16, learning_rate=2e-2), tmp_path,
                      reward_fn=_count_reward(target), metrics_sink=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == list(range(1, 17))
    rewards = [m["reward_mean"] for _, m in logged]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 1.0, rewards
    assert metrics["reward_mean_last"] > metrics["reward_mean_first"]
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "approx_kl",
                "response_length_mean", "kl_coef", "tokens_per_s", "step_seconds"):
        assert all(math.isfinite(m[key]) for _, m in logged), key
    assert logged[0][1]["kl"] == 0.0  # LoRA B starts at zero: the first policy is the reference
    assert logged[-1][1]["kl"] > 0.1

    # Outputs: a plain LoRA adapter over the base, the value head, the curve.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoints", "ppo_curve.json",
                                                          "value_head.safetensors"]
    curve = json.loads((tmp_path / "ppo_curve.json").read_text())
    assert [r["step"] for r in curve["steps"]] == list(range(1, 17))
    assert set(load_file(tmp_path / "value_head.safetensors")) == {"linear.weight", "linear.bias"}
    reloaded = PeftModel.from_pretrained(_load(small_model_dir)[0], str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tok("w1 w2 w3 w7", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(reloaded(input_ids=ids).logits, _load(small_model_dir)[0](input_ids=ids).logits,
                                  atol=1e-3)


def test_ppo_with_both_rewards_keeps_the_reward_adapter_and_the_base_frozen(tiny_model_dir, reward_adapter_dir,
                                                                           tmp_path):
    from safetensors.torch import load_file

    model, tok = _load(tiny_model_dir)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [{"prompt": tok.apply_chat_template([{"role": "user", "content": f"code A0{i}?"}], tokenize=False,
                                                  add_generation_prompt=True)} for i in range(4)]
    logged = []
    run_ppo(model, tok, prompts, PPOSettings(steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=4,
                                             learning_rate=1e-2, save_steps=10, reward_suffix="<|im_end|>\n"),
            tmp_path, reward_fn=lambda p, c, **_: [float(len(x)) for x in c], reward_adapter=reward_adapter_dir,
            reward_weights=(0.5, 2.0), metrics_sink=lambda s, m: logged.append(m))
    for m in logged:
        assert m["reward_mean"] == pytest.approx(0.5 * m["score_adapter_mean"] + 2.0 * m["score_fn_mean"], rel=1e-4)
    # run_ppo wrapped `model` in place: its reward adapter still holds exactly the saved weights.
    saved = load_file(reward_adapter_dir / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    checked = 0
    for key, value in saved.items():
        if "lora_" in key:
            name = key.removeprefix("base_model.model.").replace(".weight", ".reward.weight")
            assert torch.equal(params[name], value), name
            checked += 1
    assert checked > 0
    # The base weights did not move either; the policy adapter did.
    state = model.state_dict()
    for k, v in base_before.items():
        name = k.replace(".weight", ".base_layer.weight") if k.replace(".weight", ".base_layer.weight") in state else k
        assert torch.equal(state[name], v), k
    assert any(p.abs().sum() > 0 for n, p in params.items() if "lora_B.policy" in n)


def test_dora_and_rslora_reach_the_policy_and_reward_adapters(tiny_model_dir, tmp_path):
    """alignment.lora.use_dora / use_rslora: PPO trains and saves a DoRA policy adapter (magnitudes included)
    next to a DoRA reward adapter as the reward stage saves it (methods.lora_config), which stays put."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from components.training.methods import lora_config
    from components.config import LoraSettings

    torch.manual_seed(1)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    reward_lora = lora_config(LoraSettings(r=4, alpha=8, use_dora=True, use_rslora=True), "SEQ_CLS")
    reward_lora.modules_to_save, reward_lora.init_lora_weights = ["score"], False
    reward_dir = tmp_path / "reward_adapter"
    get_peft_model(classifier, reward_lora).save_pretrained(reward_dir)

    model, tok = _load(tiny_model_dir)
    settings = PPOSettings(steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=4, learning_rate=1e-2,
                           save_steps=10, lora_r=4, lora_use_dora=True, lora_use_rslora=True)
    run_ppo(model, tok, _small_prompts(4), settings, tmp_path / "ppo", reward_fn=lambda p, c, **_: [1.0] * len(c),
            reward_adapter=reward_dir, reward_weights=(0.5, 1.0))
    saved_config = json.loads((tmp_path / "ppo" / "adapter" / "adapter_config.json").read_text())
    assert saved_config["use_dora"] and saved_config["use_rslora"]
    policy = load_file(tmp_path / "ppo" / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in policy)
    params = dict(model.named_parameters())
    reward = load_file(reward_dir / "adapter_model.safetensors")
    magnitudes = [k for k in reward if "lora_magnitude_vector" in k]
    assert magnitudes
    for key in magnitudes:  # the reward adapter's magnitudes are loaded as they were saved, and left alone
        name = key.removeprefix("base_model.model.").removesuffix(".weight")
        name = name.replace("lora_magnitude_vector", "lora_magnitude_vector.reward") + ".weight"
        assert torch.equal(params[name], reward[key]), name


def test_a_crashed_run_resumes_to_the_same_result(small_model_dir, tmp_path):
    from safetensors.torch import load_file

    target_id = _load(small_model_dir)[1].convert_tokens_to_ids("w7")
    # A schedule too, so the resumed run must restore it to match (4 steps x 2 epochs x 2 minibatches).
    settings = _toy_settings(steps=4, save_steps=2, lr_scheduler="linear", warmup_ratio=0.25, weight_decay=0.01)

    model, tok = _load(small_model_dir)
    straight = []
    run_ppo(model, tok, _small_prompts(), settings, tmp_path / "straight", reward_fn=_count_reward(target_id),
            metrics_sink=lambda s, m: straight.append(m))

    def crash_at_3(step, m):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")

    model, tok = _load(small_model_dir)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(model, tok, _small_prompts(), settings, tmp_path / "crashed", reward_fn=_count_reward(target_id),
                metrics_sink=crash_at_3)
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"]
    (ckpts / "step-3").mkdir()  # a half-written checkpoint from a crash mid-save: ignored and removed

    model, tok = _load(small_model_dir)
    resumed = []
    metrics = run_ppo(model, tok, _small_prompts(), settings, tmp_path / "crashed", reward_fn=_count_reward(target_id),
                      metrics_sink=lambda s, m: resumed.append(m))
    assert metrics["resumed_from_step"] == 2 and len(resumed) == 2
    assert not (ckpts / "step-3").exists()
    for a, b in zip(straight[2:], resumed):
        assert a["reward_mean"] == b["reward_mean"] and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    one = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "crashed" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k
    curve = json.loads((tmp_path / "crashed" / "ppo_curve.json").read_text())["steps"]
    assert [r["step"] for r in curve] == [1, 2, 3, 4]
    schedule = torch.load(ckpts / "step-4" / "scheduler.pt", weights_only=True)
    assert schedule["last_epoch"] == 16 and schedule["_last_lr"] == [0.0, 0.0]  # linear: down to 0 at the end


def test_kl_beyond_max_kl_raises_after_keeping_the_last_good_state(small_model_dir, tmp_path):
    model, tok = _load(small_model_dir)
    target = tok.convert_tokens_to_ids("w7")
    with pytest.raises(AlignmentDiverged, match="max_kl") as caught:
        run_ppo(model, tok, _small_prompts(), _toy_settings(steps=12, max_kl=1.0, save_steps=1, learning_rate=3e-2),
                tmp_path, reward_fn=_count_reward(target))
    err = caught.value
    assert err.step >= 2  # step 1's policy is the reference (KL 0)
    assert f"step {err.step}" in str(err)
    # The last good policy is the one before the step whose rollout broke the bound; nothing newer is kept.
    assert err.checkpoint is not None and err.checkpoint.name == f"step-{err.step - 2}"
    assert (err.checkpoint / ppo.COMPLETE).exists()
    assert max(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").iterdir()) == err.step - 2


def test_nan_reward_and_nan_loss_raise_the_named_error(small_model_dir, tmp_path, monkeypatch):
    model, tok = _load(small_model_dir)
    calls = []

    def flaky(prompts, completions, **_):
        calls.append(1)
        return [float("nan") if len(calls) == 2 else 1.0 for _ in prompts]

    with pytest.raises(AlignmentDiverged, match="reward is NaN") as caught:
        run_ppo(model, tok, _small_prompts(), _toy_settings(steps=4), tmp_path / "reward", reward_fn=flaky)
    assert caught.value.step == 2 and caught.value.checkpoint.name == "step-0"

    real = ppo.ppo_losses
    monkeypatch.setattr(ppo, "ppo_losses", lambda *a, **k: (real(*a, **k)[0] * float("nan"), *real(*a, **k)[1:]))
    model, tok = _load(small_model_dir)
    with pytest.raises(AlignmentDiverged, match="loss is nan") as caught:
        run_ppo(model, tok, _small_prompts(), _toy_settings(steps=4), tmp_path / "loss", reward_fn=_count_reward(5))
    assert caught.value.step == 1 and caught.value.checkpoint.name == "step-0"



def test_the_value_head_trains_in_its_own_group_with_its_own_rate_and_no_decay(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir)
    settings = _toy_settings(steps=1, save_steps=1, batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=3,
                             learning_rate=1e-3, weight_decay=0.1, value_learning_rate=5e-2)
    run_ppo(model, tok, _small_prompts(4), settings, tmp_path, reward_fn=lambda p, c, **_: [1.0] * len(c))
    checkpoint = next((tmp_path / "checkpoints").glob("*/optimizer.pt"))
    policy, value = torch.load(checkpoint, weights_only=True)["param_groups"]
    assert (policy["lr"], policy["weight_decay"]) == (1e-3, 0.1)
    assert (value["lr"], value["weight_decay"]) == (5e-2, 0.0)


def test_the_template_end_of_turn_ends_a_ppo_answer_with_the_eos(tiny_model_dir, tmp_path, monkeypatch):
    """One stop rule: the alignment stage gives PPO the template's end-of-turn ids (stop_ids), as evaluation and
    RAFT stop at; the rollouts and the missing-EOS check then cut at them as at the tokenizer's EOS."""
    from components.alignment.stage import _run_ppo
    from components.config import load_config
    from components.models import generation
    from components.training import ppo

    model, tok = _load(tiny_model_dir)
    run = ppo._setup(model, tok, _small_prompts(2), _toy_settings(stop_ids=(7, 11)), tmp_path, None)
    assert {7, 11, tok.eos_token_id} <= run.eos_ids

    class Seen(Exception):
        pass

    def captured(*args, **_):  # stands in for the PPO run: what settings did the stage build?
        raise Seen(args[3])

    monkeypatch.setattr(ppo, "run_ppo", captured)
    asked = []  # the tiny tokenizer's EOS is chatml's end of turn: let the template name one more stop token
    monkeypatch.setattr(generation, "stop_ids", lambda tokenizer, template: asked.append(template) or [2, 99])
    cfg = load_config(None, ["alignment.method=ppo", "tokenize.template=chatml"])
    with pytest.raises(Seen) as seen:
        _run_ppo(model, tok, _small_prompts(2), lambda p, c, **_: [0.0] * len(c), None, cfg, tmp_path, None)
    assert seen.value.args[0].stop_ids == (2, 99) and asked == ["chatml"]
