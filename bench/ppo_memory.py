"""Peak memory of PPO with one shared model vs four separate models, side by side, same work.

    python bench/ppo_memory.py --model DIR [--steps 3] [--batch 4] [--new-tokens 16] [--out bench/results_ppo_memory.json]

`shared`: components.training.ppo.run_ppo, one base model carrying the policy LoRA, the frozen reward LoRA
(+ score head) and a value head; the reference is the base with adapters off.
`separate`: the classic layout, four full models: policy (+ LoRA), reference (frozen copy), reward (a
sequence classifier with the reward adapter merged) and value (a copy with its own LoRA + value head);
the same PPO math (the functions of components.training.ppo), settings and prompts.
Both score with the same reward adapter (random LoRA + score head, made here: memory, not quality, is measured).
Each variant runs in its own subprocess, which reports its peak RSS (VmHWM) and its RSS after imports;
the parent writes both as JSON. fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["Which ICD-10-CM chapter contains code E11.9?", "What does ICD-10-CM code I10 describe?",
             "Is ICD-10-CM code J45 billable?", "What is the ICD-10-CM code for cholera?"]


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_reward_adapter(model_dir: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["score"])
    get_peft_model(model, config).save_pretrained(out)
    return out


def prompts_for(tokenizer) -> list[dict]:
    if tokenizer.chat_template:
        render = lambda q: tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,  # noqa: E731
                                                         add_generation_prompt=True)
    else:
        render = lambda q: q  # noqa: E731
    return [{"prompt": render(q)} for q in QUESTIONS]


def settings_from(args):
    from components.training.ppo import PPOSettings

    return PPOSettings(steps=args.steps, batch_size=args.batch, mini_batch_size=args.batch, ppo_epochs=1,
                       max_new_tokens=args.new_tokens, save_steps=10_000, learning_rate=1e-4, seed=0)


def run_shared(args, tokenizer, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from components.training.ppo import run_ppo

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    metrics = run_ppo(model, tokenizer, prompts_for(tokenizer), settings_from(args), work / "out",
                      reward_adapter=Path(args.reward_adapter))
    return {"steps": int(metrics["ppo_steps"]), "seconds": metrics["ppo_seconds"]}


def run_separate(args, tokenizer, work: Path) -> dict:
    """Four models, the same PPO step as run_ppo (generation, logprobs, reward, GAE, clipped losses)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from components.training import ppo

    s = settings_from(args)
    load = lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()  # noqa: E731
    lora = lambda: LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, target_modules=s.lora_target_modules,  # noqa: E731
                              task_type="CAUSAL_LM")
    torch.manual_seed(s.seed)
    policy = get_peft_model(load(), lora()).eval()
    reference = load().requires_grad_(False)
    reward = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    reward = PeftModel.from_pretrained(reward, args.reward_adapter).merge_and_unload().eval().requires_grad_(False)
    reward.config.pad_token_id = tokenizer.pad_token_id
    value_model = get_peft_model(load(), lora()).eval()
    value_head = ppo.ValueHead(value_model.get_base_model().config.hidden_size)
    params = [p for p in policy.parameters() if p.requires_grad] + \
             [p for p in value_model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)

    rows = prompts_for(tokenizer)
    encoded = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    eos = {tokenizer.eos_token_id}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    for step in range(1, s.steps + 1):
        idx = ppo._prompt_order(len(rows), s.batch_size, step, s.seed)
        query, query_mask = ppo.left_pad([encoded[i] for i in idx], pad)
        response, response_mask = ppo.generate(policy, query, query_mask, s, eos_ids=eos, pad_token_id=pad)
        ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
        with torch.no_grad():
            logprobs, _, _ = ppo.response_forward(policy, query, query_mask, response, response_mask, temperature=s.temperature)
            ref, _, _ = ppo.response_forward(reference, query, query_mask, response, response_mask, temperature=s.temperature)
            scores = reward(input_ids=ids, attention_mask=mask, position_ids=ppo.position_ids(mask)).logits[:, 0]
            hidden = ppo.decoder_hidden(value_model, ids, mask)[:, query.shape[1] - 1 : -1]
            values = torch.where(response_mask.bool(), value_head(hidden), 0.0)
        rewards, _ = ppo.token_rewards(scores, logprobs, ref, response_mask, s.kl_coef)
        advantages, returns = ppo.gae(rewards, values, response_mask, s.gamma, s.lam)
        advantages = ppo.masked_whiten(advantages, response_mask)
        for _ in range(s.ppo_epochs):
            new_lp, _, _ = ppo.response_forward(policy, query, query_mask, response, response_mask, temperature=s.temperature)
            hidden = ppo.decoder_hidden(value_model, ids, mask)[:, query.shape[1] - 1 : -1]
            new_v = torch.where(response_mask.bool(), value_head(hidden), 0.0)
            pg, vf, _ = ppo.ppo_losses(new_lp, new_v, logprobs, values, advantages, returns, response_mask, s)
            optimizer.zero_grad(set_to_none=True)
            (pg + s.vf_coef * vf).backward()
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
    return {"steps": s.steps, "seconds": time.perf_counter() - t0}


def child(args) -> None:
    import peft  # noqa: F401  (imported before the baseline: library code is nobody's model memory)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import components.training.ppo  # noqa: F401

    config = AutoConfig.from_pretrained(args.model)
    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        auto._model_mapping[type(config)]  # imports the architecture's modeling module
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    after_imports = rss_mb("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_shared if args.child == "shared" else run_separate)(args, tokenizer, Path(tmp))
    result.update(peak_rss_mb=rss_mb("VmHWM"), rss_after_imports_mb=after_imports)
    result["peak_above_imports_mb"] = result["peak_rss_mb"] - after_imports
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face causal-LM directory")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="prompts per PPO step")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_ppo_memory.json"))
    parser.add_argument("--child", choices=["shared", "separate"], help=argparse.SUPPRESS)
    parser.add_argument("--reward-adapter", help=argparse.SUPPRESS)
    parser.add_argument("--make-reward-adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_reward_adapter:
        make_reward_adapter(args.model, Path(args.make_reward_adapter))
        return
    if args.child:
        child(args)
        return

    from transformers import AutoConfig

    env = {**os.environ, "LMFORGE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        # Made in a subprocess so the parent stays light and its memory is nobody's peak.
        adapter = Path(tmp) / "reward_adapter"
        subprocess.run([sys.executable, __file__, "--model", args.model, "--make-reward-adapter", str(adapter)],
                       check=True, env=env)
        variants = {}
        for variant in ("shared", "separate"):
            cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
                   "--reward-adapter", str(adapter)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"variant {variant} failed (rc {proc.returncode})")
            variants[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    config = AutoConfig.from_pretrained(args.model)
    shared, separate = variants["shared"], variants["separate"]
    result = {
        "model": args.model,
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "steps": args.steps, "batch": args.batch, "new_tokens": args.new_tokens, "precision": "fp32", "device": "cpu",
        "variants": variants,
        "saved_mb": separate["peak_rss_mb"] - shared["peak_rss_mb"],
        "separate_over_shared_above_imports": separate["peak_above_imports_mb"] / max(shared["peak_above_imports_mb"], 1e-9),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
