"""How well can "Is ICD-10-CM code X billable?" be answered from the code's shape alone?

On a category no training stage saw, the code's shape is all a model has to go on: its length and letters.
This fits two shape rules on the shipped train rows and scores them on each held-out billable set:

- length: the more frequent answer per code length;
- length + first letter: the same per (length, first letter) pair, which picks up that injury codes (S, T)
  run to 7 characters while most others stop at 4 or 5.

Yes and No are weighted equally when fitting (every file is half Yes). A model that only learned the
shape rule scores about the rule's figure; the goal of the evaluation issue (billable >= 0.75) is only
reachable on a set where the rule itself gets there.

    python bench/billable_ceiling.py    # a second; prints one JSON object, quoted in bench/quality.md
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "icd10"
QUESTION = re.compile(r"^Is ICD-10-CM code (\S+) billable\?$")
RULES = {"length": lambda code: len(code), "length+letter": lambda code: (len(code), code[0])}


def billable_rows(name: str) -> list[tuple[str, str]]:
    """(code without its dot, "Yes"/"No") for every billable question of one shipped file."""
    rows = []
    for line in (DATA / name).open(encoding="utf-8"):
        row = json.loads(line)
        match = QUESTION.match(row["instruction"])
        if match:
            rows.append((match.group(1).replace(".", ""), row["output"]))
    return rows


def fit(rows: list[tuple[str, str]], key) -> dict:
    """Per key, the answer with the larger share of its class (Yes and No weighted equally)."""
    counts: dict = {}
    totals = Counter(answer for _, answer in rows)
    for code, answer in rows:
        counts.setdefault(key(code), Counter())[answer] += 1
    return {k: max(("Yes", "No"), key=lambda a: c[a] / totals[a]) for k, c in counts.items()}


def score(rule: dict, key, rows: list[tuple[str, str]], fallback: str = "Yes") -> float:
    return sum(rule.get(key(code), fallback) == answer for code, answer in rows) / len(rows)


def main() -> None:
    fits = {
        "round-robin 800 (sft_train)": billable_rows("sft_train.jsonl"),
        "uniform 2400 (sft_billable_train)": billable_rows("sft_billable_train.jsonl"),
    }
    fits["both 3200"] = [row for rows in fits.values() for row in rows]
    tests = {"billable (sft_heldout, 60)": billable_rows("sft_heldout.jsonl"),
             "billable_uniform (sft_billable_heldout, 300)": billable_rows("sft_billable_heldout.jsonl")}
    result = {}
    for test_name, test_rows in tests.items():
        three = sum(len(code) == 3 for code, _ in test_rows) / len(test_rows)
        result[test_name] = {"share_3_character": round(three, 3)}
        for fit_name, fit_rows in fits.items():
            for rule_name, key in RULES.items():
                result[test_name][f"{rule_name}, fit on {fit_name}"] = round(score(fit(fit_rows, key), key, test_rows), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
