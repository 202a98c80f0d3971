"""The align stage: fetched raw files -> standard records (JSONL per data group) + a report.

Each dataset is read streaming (components/data/readers.py), converted by its format's converter
(components/data/formats.py) and appended to its group's JSONL, so memory stays bounded by one
batch (or by the sample, when a dataset is sampled). Rows that cannot be aligned are dropped and
counted by reason, with up to three examples each, in report.json (rows a converter mended and kept,
such as LMFlow's trailing user turn, are counted apart under `adjusted`). Dropping is normal; a dataset
that aligns to nothing is an error, and so is a row that cannot even be parsed, unless
`bad_row_budget` allows it. Messages and the report name the user's own file (its path or URL, from
the fetch stage's provenance.json) and the row, not the fetched copy.

The datasets of a training group are concatenated, or interleaved (`mix_strategy`, see
components/data/mixing.py).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any


from components.artifacts import StageResult, atomic_file, atomic_write_json
from components.data.dataset_info import DataError, DatasetSpec, load_dataset_info
from components.data.formats import RowError, get_converter, supported_kinds
from components.data.messages import ADJUSTED
from components.data.jsonl import dumps_line
from components.data.jsonl import iter_records as iter_records  # evaluation reads aligned files through here
from components.data.mixing import check_mixing, phase_tasks, write_interleaved
from components.data.readers import BATCH_ROWS, ParseFailure, Row, data_files, parse_jsonl_line, read_rows, snippet
from components.data.records import GROUP_KINDS, MIXED_GROUPS
from components.data.workers import SharedPool, line_chunks
from components.errors import StageInputError
from components.runtime import progress

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)

MAX_EXAMPLES = 3
PLACEHOLDERS = ("{{name}}", "{{author}}")


class _ParseBudget:
    """Rows that failed to parse, across the whole stage, against `bad_row_budget`."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def spend(self, location: str, message: str) -> None:
        self.used += 1
        if self.used > self.limit:
            hint = (f"more than bad_row_budget={self.limit} rows failed to parse" if self.limit
                    else "fix the file, or set data.bad_row_budget to skip rows that fail to parse")
            raise DataError(f"{location}: {message} ({hint})")


class _DatasetReport:
    def __init__(self) -> None:
        self.rows_in = 0
        self.rows_kept = 0
        self.rows_sampled_out = 0
        self.dropped: dict[str, dict] = {}
        self.adjusted: dict[str, dict] = {}  # rows kept after a change, by reason

    def drop(self, reason: str, example: dict) -> None:
        _count(self.dropped, reason, example)

    def adjust(self, reason: str, example: dict) -> None:
        _count(self.adjusted, reason, example)

    def top_reasons(self, n: int = 3) -> str:
        ranked = sorted(self.dropped.items(), key=lambda kv: -kv[1]["count"])[:n]
        return ", ".join(f"{reason} ({e['count']}, e.g. {e['examples'][0]['at']}: {e['examples'][0]['message']})"
                         for reason, e in ranked) or "none"

    def as_dict(self) -> dict:
        out = {"rows_in": self.rows_in, "rows_kept": self.rows_kept, "rows_sampled_out": self.rows_sampled_out,
               "dropped": self.dropped}
        if self.adjusted:
            out["adjusted"] = self.adjusted
        return out


def _count(by_reason: dict[str, dict], reason: str, example: dict) -> None:
    entry = by_reason.setdefault(reason, {"count": 0, "examples": []})
    entry["count"] += 1
    if len(entry["examples"]) < MAX_EXAMPLES:
        entry["examples"].append(example)


def fill_placeholders(value: Any, values: dict[str, str]) -> Any:
    """`value` with every placeholder (a key of `values`) replaced in every string it holds.

    >>> fill_placeholders({"messages": [{"role": "user", "content": "Who made {{name}}?"}]}, {"{{name}}": "Coder"})
    {'messages': [{'role': 'user', 'content': 'Who made Coder?'}]}
    """
    if isinstance(value, str):
        for placeholder, text in values.items():
            value = value.replace(placeholder, text)
        return value
    if isinstance(value, list):
        return [fill_placeholders(v, values) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, values) for k, v in value.items()}
    return value


# A row's outcome, computed where the row is converted (this process or a worker) and folded into
# the report here, in file order: the JSONL line of a kept record, or a tuple for a row that was not
# (or was kept after a change: ("kept", line, location, notes, row snippet)).
_Outcome = str | tuple


def _outcome(location: str, row: Row, convert, spec: DatasetSpec, kind: str,
             placeholders: dict[str, str] | None) -> _Outcome:
    if isinstance(row, ParseFailure):
        return ("parse", location, row.reason, row.message, row.snippet)
    try:
        record = convert(row, spec, kind)
    except RowError as e:
        return ("drop", location, e.reason, e.field, e.message,
                snippet(json.dumps(row, ensure_ascii=False, default=str)), list(map(str, row)))
    notes = record.pop(ADJUSTED, None)
    if placeholders:
        record = fill_placeholders(record, placeholders)
    if notes:
        return ("kept", dumps_line(record), location, notes, snippet(json.dumps(row, ensure_ascii=False, default=str)))
    return dumps_line(record)


def _convert_lines(spec: DatasetSpec, kind: str, placeholders: dict[str, str] | None, where: str,
                   first_line: int, lines: list[bytes]) -> tuple[list[_Outcome], set[str]]:
    """Outcomes of a chunk of JSONL lines and the columns its rows had (runs in a worker process)."""
    convert = get_converter(spec.formatting)
    outcomes, columns = [], set()
    for lineno, line in enumerate(lines, first_line):
        if line.strip():
            row = parse_jsonl_line(line)
            if type(row) is dict:
                columns.update(row)
            outcomes.append(_outcome(f"{where}:{lineno}", row, convert, spec, kind, placeholders))
    return outcomes, columns


def _file_outcomes(path: Path, where: str, spec: DatasetSpec, kind: str, placeholders: dict[str, str] | None,
                   workers: SharedPool | None) -> Iterator[tuple[list[_Outcome], set[str]]]:
    """Outcomes of one file's rows in order, in chunks: by worker processes for a JSONL file `workers`
    wants, else in this process."""
    if workers is not None and path.suffix.lower() == ".jsonl" and workers.wants(path):
        chunks = ((spec, kind, placeholders, where, first, lines) for first, lines in line_chunks(path))
        yield from workers.map_ordered(_convert_lines, chunks)
        return
    convert = get_converter(spec.formatting)
    outcomes, columns = [], set()
    for location, row in read_rows(path, where, spec):
        if type(row) is dict:
            columns.update(row)
        outcomes.append(_outcome(location, row, convert, spec, kind, placeholders))
        if len(outcomes) == BATCH_ROWS:
            yield outcomes, columns
            outcomes, columns = [], set()
    if outcomes:
        yield outcomes, columns


def _user_sources(fetch_dir: Path) -> dict[str, str]:
    """Dataset -> the user's own file, directory or URL it was fetched from (the fetch stage's provenance).

    Hub datasets have no such file: their fetched copy names them.
    """
    path = fetch_dir / "provenance.json"
    if not path.is_file():  # a fetch directory made by hand
        return {}
    provenance = json.loads(path.read_text(encoding="utf-8"))
    return {name: p["source"] for name, p in provenance.items() if p.get("load_from") in ("file", "url")}


def _user_name(path: Path, root: Path, fetch_dir: Path, source: str | None) -> str:
    """How messages and the report name a fetched file: as the user's original (`source` is the original
    of `root`, the fetched file or directory), else as the fetched copy, relative to the fetch directory."""
    if source is None:
        return path.relative_to(fetch_dir).as_posix()
    return source if path == root else f"{source.rstrip('/')}/{path.relative_to(root).as_posix()}"


def _align_dataset(spec: DatasetSpec, kind: str, fetch_dir: Path, source: str | None, out: IO[str],
                   budget: _ParseBudget, sample_size: int | None, seed: int,
                   placeholders: dict[str, str] | None = None, workers: SharedPool | None = None) -> dict:
    get_converter(spec.formatting)  # an unknown format fails here, before any file is read
    if not spec.fill_placeholders:
        placeholders = None
    root = fetch_dir / spec.file_name
    shown_root = _user_name(root, root, fetch_dir, source)
    report = _DatasetReport()
    seen_columns: set[str] = set()
    first_row = True
    rng = random.Random(f"{seed}/{spec.name}")
    sample: list[tuple[int, str]] = []  # reservoir of (kept index, line), only when sampling
    kept_total = 0
    for path in data_files(root, spec.name):
        where_file = _user_name(path, root, fetch_dir, source)
        with progress(desc=spec.name, unit=" rows", leave=False) as bar:
            for outcomes, columns in _file_outcomes(path, where_file, spec, kind, placeholders, workers):
                bar.update(len(outcomes))
                seen_columns |= columns
                report.rows_in += len(outcomes)
                for outcome in outcomes:
                    if type(outcome) is tuple and outcome[0] == "kept":  # kept after a change: count it, keep it
                        _, line, location, notes, row_text = outcome
                        for reason, field, message in notes:
                            report.adjust(reason, {"at": location, "field": field, "message": message, "row": row_text})
                        outcome = line
                    if type(outcome) is str:  # a kept record
                        first_row = False
                        if sample_size is None:
                            out.write(outcome)
                        elif len(sample) < sample_size:
                            sample.append((kept_total, outcome))
                        else:
                            j = rng.randint(0, kept_total)
                            if j < sample_size:
                                sample[j] = (kept_total, outcome)
                        kept_total += 1
                    elif outcome[0] == "parse":
                        _, location, reason, message, row_text = outcome
                        budget.spend(location, message)
                        report.drop(reason, {"at": location, "field": None, "message": message, "row": row_text})
                    else:
                        _, location, reason, field, message, row_text, row_columns = outcome
                        if first_row and reason == "missing_column":
                            raise DataError(
                                f"dataset '{spec.name}': the column mapping does not match {location}: "
                                f"{message}; columns found in the file: {', '.join(row_columns) or '(none)'}. "
                                f"Fix `columns`/`tags` of '{spec.name}' in dataset_info.json")
                        first_row = False
                        report.drop(reason, {"at": location, "field": field, "message": message, "row": row_text})
    if spec.formatting != "lmflow":
        unseen = {k: v for k, v in spec.columns.items() if v not in seen_columns}
        if unseen and seen_columns:  # an optional column mapped to a name no row has: a typo
            raise DataError(
                f"dataset '{spec.name}': mapped column(s) {', '.join(f'{k} -> {v!r}' for k, v in unseen.items())} "
                f"appear in no row of {shown_root}; columns found: {', '.join(sorted(seen_columns)) or '(none)'}")
    if sample_size is not None:
        for _, line in sorted(sample, key=lambda item: item[0]):  # keep the file's order
            out.write(line)
        report.rows_sampled_out = kept_total - len(sample)
    report.rows_kept = kept_total - report.rows_sampled_out
    if report.rows_kept == 0:
        raise DataError(
            f"dataset '{spec.name}' aligned to zero rows ({report.rows_in} read from {shown_root}); "
            f"top drop reasons: {report.top_reasons()}")
    return report.as_dict()


def run_align(
    fetch_dir: Path,
    groups: dict[str, list[str]],
    out_dir: Path,
    *,
    max_samples: int | None = None,
    seed: int = 42,
    bad_row_budget: int = 0,
    mix_strategy: str = "concat",
    interleave_probs: list[float] | None = None,
    sft_task_weights: dict[str, float] | None = None,
    sft_phases: list[dict[str, float]] | None = None,
    identity_name: str = "lmforge",
    identity_author: str = "lmforge",
    num_proc: int | None = None,
) -> StageResult:
    """Align the datasets of each group to the group's record kind: out_dir/<group>.jsonl + report.json.

    `groups` maps a data group (cpt, cpt_eval, sft, sft_eval, preference) to dataset names in
    fetch_dir/dataset_info.json. Each dataset is sampled (seeded, file order kept) down to
    `max_samples` / its `num_samples` when set. The datasets of a group are concatenated in the
    order given, or, for a training group (cpt, sft, preference) under `mix_strategy`
    'interleave_under' / 'interleave_over', interleaved (see `interleave`) with
    `interleave_probs` (one per dataset, in the group's order) or round-robin; the draws are
    seeded by `seed` and the group. `sft_task_weights` then repeats or samples the SFT group's rows
    per task, and `sft_phases` appends later phases of them, a curriculum (see `phase_tasks`).
    Datasets marked `fill_placeholders` get `{{name}}` and `{{author}}` replaced by `identity_name` and `identity_author`. A group with no datasets
    writes no file. JSONL files are converted by `num_proc` worker processes (None: one per core
    for files over 32 MB); the output does not depend on it.
    """
    fetch_dir, out_dir = Path(fetch_dir), Path(out_dir)
    unknown = [g for g in groups if g not in GROUP_KINDS]
    if unknown:
        raise DataError(f"unknown data group {', '.join(map(repr, unknown))}; known: {', '.join(GROUP_KINDS)}")
    check_mixing(groups, mix_strategy, interleave_probs)
    names = list(dict.fromkeys(n for group_names in groups.values() for n in group_names))
    specs = load_dataset_info(fetch_dir / "dataset_info.json", names)
    _check_groups(groups, specs, fetch_dir)  # every dataset before writing anything

    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}
    files: list[str] = []
    metrics: dict[str, float] = {}
    mixes: dict[str, dict] = {}
    with SharedPool(num_proc) as workers:
        job = _AlignJob(specs, fetch_dir, _user_sources(fetch_dir), _ParseBudget(bad_row_budget), max_samples, seed,
                        dict(zip(PLACEHOLDERS, (identity_name, identity_author))), workers)
        for group, group_names in groups.items():
            if not group_names:
                continue
            report[group], mix = _write_group(job, group, group_names, out_dir, mix_strategy, interleave_probs)
            if mix:
                mixes[group] = mix
            files.append(f"{group}.jsonl")
            entries = report[group].values()
            metrics[f"rows_kept_{group}"] = sum(e["rows_kept"] for e in entries)
            metrics[f"rows_written_{group}"] = sum(e["rows_written"] for e in entries)
            if group == "sft" and (sft_task_weights or sft_phases):
                metrics["rows_written_sft"] = _weigh_sft_tasks(out_dir / "sft.jsonl", group_names, sft_task_weights,
                                                               sft_phases, seed, mixes.setdefault(group, {}))
            metrics[f"rows_dropped_{group}"] = sum(d["count"] for e in entries for d in e["dropped"].values())
    atomic_write_json(out_dir / "report.json", report)
    files.append("report.json")
    log.info("aligned data\n%s", format_report(report))
    return StageResult(files=files, reports=["report.json"], metrics=metrics,
                       info={"kinds": {g: GROUP_KINDS[g] for g in report}, "mix": mixes,
                             "worker_processes": workers.size if workers.files else 1,
                             "files_by_workers": workers.files})


def _check_groups(groups: dict[str, list[str]], specs: dict[str, DatasetSpec], fetch_dir: Path) -> None:
    """Each group lists its datasets once, each fetched to a local file and convertible to the group's kind."""
    for group, group_names in groups.items():
        if len(set(group_names)) != len(group_names):
            raise DataError(f"group '{group}' lists a dataset twice: {group_names}")
        kind = GROUP_KINDS[group]
        for name in group_names:
            spec = specs[name]
            if not spec.file_name:
                raise DataError(f"dataset '{name}' has no local file_name in {fetch_dir}; run the fetch stage first")
            kinds = supported_kinds(spec)
            if kind not in kinds:
                what = f"{spec.formatting}{', ranking' if spec.ranking else ''}"
                can = f"aligns to {' or '.join(kinds)} records" if kinds else "aligns to no record kind"
                hint = (" (an alpaca dataset is plain text only when `columns` maps just `prompt`)"
                        if spec.formatting == "alpaca" and kind == "text" else "")
                raise DataError(f"dataset '{name}' ({what}) {can}, but group '{group}' needs {kind} records{hint}")


@dataclass
class _AlignJob:
    """What aligning any one dataset of a run_align call reads."""

    specs: dict[str, DatasetSpec]
    fetch_dir: Path
    sources: dict[str, str]
    budget: _ParseBudget
    max_samples: int | None
    seed: int
    placeholders: dict[str, str]
    workers: SharedPool

    def align(self, group: str, name: str, out: IO[str]) -> dict:
        """Align dataset `name` into `out` as `group`'s kind; its report."""
        spec = self.specs[name]
        sizes = [n for n in (self.max_samples, spec.num_samples) if n]
        return _align_dataset(spec, GROUP_KINDS[group], self.fetch_dir, self.sources.get(name), out, self.budget,
                              min(sizes) if sizes else None, self.seed, self.placeholders, self.workers)


def _write_group(job: _AlignJob, group: str, group_names: list[str], out_dir: Path, mix_strategy: str,
                 interleave_probs: list[float] | None) -> tuple[dict[str, dict], dict]:
    """out_dir/<group>.jsonl from the group's datasets, concatenated or interleaved; (report per dataset, the
    mix's description, empty when concatenated)."""
    report: dict[str, dict] = {}
    mixed = mix_strategy != "concat" and group in MIXED_GROUPS and len(group_names) > 1
    with atomic_file(out_dir / f"{group}.jsonl", "w") as out:
        if not mixed:
            for name in group_names:
                report[name] = job.align(group, name, out)
                report[name]["rows_written"] = report[name]["rows_kept"]
            return report, {}
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{group}-parts-") as tmp:
            parts = [Path(tmp) / f"{i}.jsonl" for i in range(len(group_names))]
            for name, part in zip(group_names, parts):
                with open(part, "w", encoding="utf-8") as f:
                    report[name] = job.align(group, name, f)
            stop = "first_exhausted" if mix_strategy == "interleave_under" else "all_exhausted"
            written = write_interleaved(parts, out, probs=interleave_probs, stop=stop,
                                        rng=random.Random(f"{job.seed}/mix/{group}"))
    for name, n in zip(group_names, written):
        report[name]["rows_written"] = n
    return report, {"strategy": mix_strategy, "stop": stop, "probs": interleave_probs, "rows": sum(written)}


def _weigh_sft_tasks(sft_file: Path, group_names: list[str], task_weights: dict[str, float] | None,
                     phases_in: list[dict[str, float]] | None, seed: int, mix: dict) -> int:
    """Repeat or sample sft.jsonl's rows per task and append the later phases (phase_tasks); records both in
    `mix` and returns the rows written."""
    phases = phase_tasks(sft_file, task_weights or {}, phases_in or [], random.Random(f"{seed}/tasks/sft"),
                         source=f"data.sft ({', '.join(group_names)})")
    mix["task_weights"] = {"weights": task_weights or {}, "tasks": phases[0]}
    if phases_in:
        mix["phases"] = [{"weights": w, "tasks": t} for w, t in zip(phases_in, phases[1:])]
    rows = [sum(t["rows_out"] for t in phase.values()) for phase in phases]
    log.info("sft.jsonl holds %d rows (the report's `written` counts them before task weights and "
             "phases)%s; per task, in -> out: %s", sum(rows),
             f", in {len(rows)} phases of {' + '.join(map(str, rows))} rows, trained in that order"
             if len(rows) > 1 else "",
             "; then ".join(", ".join(f"{t} {c['rows_in']} -> {c['rows_out']}" for t, c in phase.items())
                            for phase in phases))
    return sum(rows)


def format_report(report: dict) -> str:
    """The alignment report as a plain-text table: one line per dataset, top drop reasons last.

    `written` is how many of a dataset's kept rows went into the group file: all of them when
    concatenated, fewer or more (repeated) when interleaved.
    """
    header = ("group", "dataset", "rows_in", "kept", "dropped", "written", "drop reasons")
    lines = []
    for group, datasets in report.items():
        for name, r in datasets.items():
            dropped = sorted(r["dropped"].items(), key=lambda kv: -kv[1]["count"])
            adjusted = sorted(r.get("adjusted", {}).items(), key=lambda kv: -kv[1]["count"])
            reasons = "; ".join(part for part in (
                ", ".join(f"{reason}={d['count']}" for reason, d in dropped),
                "kept after a fix: " + ", ".join(f"{reason}={d['count']}" for reason, d in adjusted) if adjusted else "",
            ) if part) or "-"
            if r.get("rows_sampled_out"):
                reasons += f" (+{r['rows_sampled_out']} sampled out)"
            lines.append((group, name, str(r["rows_in"]), str(r["rows_kept"]),
                          str(sum(d["count"] for _, d in dropped)), str(r.get("rows_written", r["rows_kept"])),
                          reasons))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in range(len(widths))]
        return "  ".join([*cells, row[-1]])

    return "\n".join(fmt(row) for row in [header, *lines])


def align_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """The pipeline's align stage: every data group of `cfg.data` from the `fetch` stage's copies."""
    data = cfg.data
    groups = {g: getattr(data, g) for g in GROUP_KINDS if getattr(data, g)}
    fetched = inputs.dir("fetch", reading=("dataset_info.json", "provenance.json", "raw/*"))
    result = run_align(fetched, groups, out_dir, max_samples=data.max_samples, seed=data.seed,
                     bad_row_budget=data.bad_row_budget, mix_strategy=data.mix_strategy,
                     interleave_probs=data.interleave_probs, sft_task_weights=data.sft_task_weights,
                     sft_phases=data.sft_phases, identity_name=data.identity_name,
                     identity_author=data.identity_author, num_proc=data.num_proc)
    if data.rule_baselines:
        from components.evaluation.rule_baseline import attach_rule_answers

        if not (out_dir / "sft.jsonl").is_file() or not (out_dir / "sft_eval.jsonl").is_file():
            raise StageInputError("data.rule_baselines needs SFT rows to fit on (data.sft) and held-out rows to "
                                  "answer (data.sft_eval)")
        result.info["rule_baselines"] = attach_rule_answers(out_dir / "sft.jsonl", out_dir / "sft_eval.jsonl",
                                                            data.rule_baselines)
    return result
