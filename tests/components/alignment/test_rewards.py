"""The one reward interface: rule by dotted path, HTTP endpoint, weighted sum; the ICD-10 rule."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from components.alignment.icd10 import answer_score, icd10_reward
from components.alignment.raft import select
from components.alignment.rewards import (CombinedReward, HttpReward, RewardError, build_reward, is_degenerate,
                                          load_rule)
from components.config import RewardFunctionConfig
from components.errors import TransientError, is_transient


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize(("completion", "reference", "expected"), [
    ("Diseases of the digestive system", "Diseases of the digestive system", 1.0),
    ("diseases of the digestive system.", "Diseases of the digestive system", 1.0),
    ("K27.4", "K27.9", 0.5),
    ("The code is K27.9", "K27.9", 1.0),
    ("K11", "K27.9", 0.2),
    ("E11", "K27.9", 0.0),
    ("no code here", "K27", 0.0),
    ("Yes", "No", 0.0),
    ("", "Yes", 0.0),
    ("the the the the", "Diseases of the eye", 0.0),
])
def test_icd10_reward_gives_partial_credit_on_one_scale(completion, reference, expected):
    assert answer_score(completion, reference) == pytest.approx(expected)


def test_icd10_reward_text_overlap_never_reaches_exact():
    near = answer_score("Diseases of the digestive tract", "Diseases of the digestive system")
    assert 0.4 < near < 0.8
    assert icd10_reward(["p", "p"], ["Yes", "No"], reference=["Yes", "Yes"], task=["billable"] * 2) == [1.0, 0.0]


def test_rule_loads_by_dotted_path_and_bad_paths_say_why():
    assert load_rule("tests.components.alignment.test_rewards:length_reward")(["p"], ["abc"]) == [3.0]
    assert load_rule("tests.components.alignment.test_rewards.length_reward") is length_reward
    with pytest.raises(RewardError, match="cannot import"):
        load_rule("no_such_module:fn")
    with pytest.raises(RewardError, match="no callable"):
        load_rule("components.alignment.icd10:nothing")


def test_combined_reward_weights_parts_and_checks_answers():
    cfg = RewardFunctionConfig(rule="tests.components.alignment.test_rewards:length_reward", rule_weight=0.5)
    reward = build_reward(cfg)
    assert reward(["p", "p"], ["ab", "abcd"]) == [1.0, 2.0]
    assert reward.last_parts == {"rule": [2.0, 4.0]}
    bad = CombinedReward([("broken", 1.0, lambda p, c, **_: [1.0])])
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        bad(["p", "p"], ["a", "b"])
    nan = CombinedReward([("nan", 1.0, lambda p, c, **_: [float("nan")] * len(c))])
    with pytest.raises(RewardError, match="finite"):
        nan(["p"], ["a"])
    with pytest.raises(RewardError, match="reward stage"):
        build_reward(RewardFunctionConfig(model_weight=1.0))


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/fail":
            self.send_response(503)
            self.end_headers()
            return
        rewards = [float(len(c)) + (1.0 if r == "x" else 0.0)
                   for c, r in zip(body["completions"], body["columns"]["reference"])]
        payload = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_http_reward_posts_columns_and_5xx_is_transient():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        reward = HttpReward(url + "/score")
        # Columns that are not JSON lists (TRL passes tensors and its state) are not sent.
        assert reward(["p", "q"], ["ab", "c"], reference=["x", "y"], trainer_state=object()) == [3.0, 1.0]
        with pytest.raises(TransientError) as err:
            HttpReward(url + "/fail")(["p"], ["a"], reference=["x"])
        assert is_transient(err.value)
    finally:
        server.shutdown()
    with pytest.raises(TransientError, match="unreachable"):
        HttpReward(url + "/score", timeout_s=2)(["p"], ["a"])


def test_degenerate_answers_and_raft_selection():
    assert is_degenerate("") and is_degenerate("  ") and is_degenerate("no no no")
    assert is_degenerate("a b a b a b") and not is_degenerate("Diseases of the eye and adnexa")
    groups = [[("A00", 0.2), ("A01", 0.9), ("", 5.0)], [("x y x y x y", 3.0), ("B20", 0.1)]]
    # Kept as (prompt index, sample index in its group, text, reward).
    assert select(groups, "best_per_prompt", 0.5) == [(0, 1, "A01", 0.9), (1, 1, "B20", 0.1)]
    assert select(groups, "top_fraction", 0.34) == [(0, 1, "A01", 0.9)]
    # A threshold drops what is not above it: prompt 1's best (0.1) goes, and with it the prompt.
    assert select(groups, "best_per_prompt", 0.5, threshold=0.1) == [(0, 1, "A01", 0.9)]
    assert select(groups, "top_fraction", 1.0, threshold=0.0) == [(0, 1, "A01", 0.9), (0, 0, "A00", 0.2),
                                                                   (1, 1, "B20", 0.1)]
    # Contested prompts only: a prompt whose answers all scored the same has nothing to rank.
    solved = [[("Yes", 1.0), ("Yes", 1.0)], [("No", 0.0), ("Yes", 1.0)], [("No", 0.0), ("No", 0.0)]]
    assert select(solved, "best_per_prompt", 0.5) == [(0, 0, "Yes", 1.0), (1, 1, "Yes", 1.0), (2, 0, "No", 0.0)]
    assert select(solved, "best_per_prompt", 0.5, contested_only=True) == [(1, 1, "Yes", 1.0)]
    assert select(solved, "top_fraction", 1.0, threshold=0.0, contested_only=True) == [(1, 1, "Yes", 1.0)]
    # One text twice (two token sequences that decode alike): the better-scored sample is named, not the text.
    twins = [[("A01", 0.2), ("A01", 0.7)]]
    assert select(twins, "best_per_prompt", 0.5) == [(0, 1, "A01", 0.7)]


def test_response_metrics_report_diversity_length_and_rewards():
    from components.alignment.scoring import msttr, response_metrics

    assert msttr(["a b"] * 50, segment=50) == pytest.approx(2 / 50)
    assert msttr(["too short"]) != msttr(["too short"])  # NaN: not one full window
    m, per_answer = response_metrics(["p", "p", "p"], ["K27.9", "K11", "Yes"], ["K27.9", "K27.9", "No"],
                                     ["code", "code", "billable"], rule="components.alignment.icd10:icd10_reward",
                                     reward_model=lambda p, c, **_: [2.0, 4.0, 0.0], resamples=200)
    assert m["verifiable_reward"] == pytest.approx((1.0 + 0.2 + 0.0) / 3)
    assert 0.0 <= m["verifiable_reward_ci_low"] < m["verifiable_reward"] < m["verifiable_reward_ci_high"] <= 1.0
    assert m["task/code/verifiable_reward"] == pytest.approx(0.6) and m["task/billable/verifiable_reward"] == 0.0
    assert m["reward_model_mean"] == 2.0
    assert m["response_words_mean"] == 1.0 and m["unique_words"] == 3.0
    assert per_answer == {"verifiable_reward": [1.0, 0.2, 0.0], "reward_model_score": [2.0, 4.0, 0.0]}


def test_sampling_prompts_keep_a_repeated_question_once(tiny_model_dir, tmp_path):
    from components.alignment.data import sampling_prompts
    from components.models.loading import load_tokenizer

    def record(q: str, a: str, task: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "task": task}

    rows = [record(f"question {i}?", f"answer {i}", "t") for i in range(5)] * 3  # as sft_task_weights repeats rows
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = sampling_prompts(path, tokenizer, "auto", None, limit=100, seed=0)
    assert sorted(p["reference"] for p in prompts) == [f"answer {i}" for i in range(5)]
    assert len(sampling_prompts(path, tokenizer, "auto", None, limit=3, seed=0)) == 3
    assert all(p["task"] == "t" and "question" in p["prompt"] for p in prompts)
