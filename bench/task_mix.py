"""How fast the demo model learns each ICD-10 task under a task mix: held-out accuracy every N steps.

    python bench/task_mix.py --mix code_to_chapter=1,description_to_chapter=1 --steps 400 --eval-every 100
    python bench/task_mix.py --mix code_to_chapter=3,billable=2 --steps 500 --then billable=1:200   # a curriculum

A probe for choosing `data.sft_task_weights`, not lmforge's training path: a plain LoRA loop (r16, alpha 32,
all linear layers, AdamW at 1e-3, 3% warmup then cosine, batch 8, fp32 on CPU) on the embedded
SmolLM2-135M-Instruct, drawing each row's task with the weights given, then a row of that task at random
from data/icd10/sft_train.jsonl. Rows are encoded exactly as training and evaluation encode them (the chat
template, no system prompt, loss on the answer only). Every `--eval-every` steps it scores the held-out rows
of each task in `--tasks` by constrained choice (the likeliest of the 22 chapter titles, or of Yes/No), the
evaluate stage's own scorer, and prints one JSON line. It writes nothing; figures quoted in bench/quality.md.
Written by hand because the question is "when does a task click", which needs evaluation inside the loop.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mix", default="code_to_chapter=1,description_to_chapter=1,billable=1,"
                   "code_to_description=1,description_to_code=1", help="task=weight,... (draw probabilities)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--then", action="append", default=[], metavar="MIX:STEPS",
                   help="a later phase (a curriculum): STEPS steps drawing from MIX after the ones before; "
                        "repeatable, and the learning-rate schedule spans all phases")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--tasks", default="code_to_chapter,description_to_chapter,billable", help="tasks scored")
    p.add_argument("--train", default="sft_train.jsonl", help="data/icd10 files to train on, comma-separated")
    p.add_argument("--heldout", default="sft_heldout.jsonl", help="data/icd10 files to score, comma-separated")
    return p.parse_args()


def _padded(batch: list[tuple[list[int], list[int]]], pad: int):
    """Token ids, attention mask and labels of (ids, labels) rows, right-padded to the longest."""
    import torch

    from components.data.records import IGNORE

    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in batch])
    return ids, mask, labels


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from components.data.chat_render import encode_conversations, prepare_template
    from components.evaluation.choice import choose
    from components.models.loading import load_tokenizer, resolve_base

    a = _arguments()

    torch.manual_seed(0)
    rng = random.Random(0)
    def mix(text: str) -> dict[str, float]:
        return {k: float(v) for k, v in (kv.split("=") for kv in text.split(","))}

    phases = [(mix(a.mix), a.steps)] + [(mix(m), int(n)) for m, n in (t.rsplit(":", 1) for t in a.then)]
    total = sum(n for _, n in phases)
    all_tasks = {task for weights_of, _ in phases for task in weights_of}
    data = ROOT / "data" / "icd10"
    def rows_of(names: str) -> list[dict]:
        return [json.loads(line) for name in names.split(",") for line in open(data / name, encoding="utf-8")]

    train, held = rows_of(a.train), rows_of(a.heldout)
    source = resolve_base("embedded:smollm2-135m-instruct")
    tok = load_tokenizer(source)
    tmpl = prepare_template(tok, "auto")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    encoded = {
        task: encode_conversations(
            tok, tmpl, [([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
                         None) for r in train if r["task"] == task],
            system_prompt=None, train_on_prompt=False, mask_history=True)
        for task in all_tasks
    }
    ends = [sum(n for _, n in phases[: i + 1]) for i in range(len(phases))]  # last step of each phase

    def phase_at(step: int) -> tuple[list[str], list[float]]:
        weights_of = phases[next(i for i, end in enumerate(ends) if step <= end)][0]
        return list(weights_of), list(weights_of.values())

    titles = sorted({r["output"] for r in train if r["task"] == "code_to_chapter"})
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def evaluate(step: int) -> None:
        scores_by_task = {}
        for task in a.tasks.split(","):
            rows = [r for r in held if r["task"] == task]
            candidates = titles if "chapter" in task else ["Yes", "No"]
            picks, _ = choose(tok, model, "auto", [[{"role": "user", "content": r["instruction"]}] for r in rows],
                              candidates, system_prompt=None)
            right = sum(pick == r["output"] for pick, r in zip(picks, rows))
            scores_by_task[task] = round(right / len(rows), 3)
        print(json.dumps({"step": step, **scores_by_task}), flush=True)
        model.train()

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr)
    warm = max(1, int(0.03 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / total))))
    model.train()
    t0, losses = time.time(), []
    for step in range(1, total + 1):
        tasks, draw = phase_at(step)
        batch = [rng.choice(encoded[rng.choices(tasks, draw)[0]]) for _ in range(a.batch)]
        ids, mask, labels = _padded(batch, pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 25 == 0:
            print(f"step {step} loss {sum(losses[-25:]) / 25:.3f} {(time.time() - t0) / step:.2f}s/step", flush=True)
        if step % a.eval_every == 0:
            evaluate(step)


if __name__ == "__main__":
    main()
