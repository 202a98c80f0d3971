"""The `lmforge` command line: run the flow, show the plan and the cache, chat with or serve any model."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from flows.cli_cache import cache_app, stages
from flows.cli_common import (ConfigArg, SetOpt, check_stage_names, console, failures_reported, fmt, load,
                              table_console)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="lmforge: domain adaptation as a cached, tracked pipeline.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets without training.")
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")


@app.command()
def run(
    config: ConfigArg = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Recompute from this stage on, even if cached.")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Run only this stage on cached upstream outputs.")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Stop after this stage (e.g. sft: train, no evaluation).")] = None,
    verify: Annotated[str, typer.Option(help="How cached outputs are checked: fast (sizes, mtimes) or deep (rehash).")] = "fast",
    set_: SetOpt = [],  # noqa: B006 (typer reads the default)
) -> None:
    """Run the domain-adaptation flow end to end (cached stages are reused)."""
    check_stage_names(from_stage, only, until)
    if verify not in ("fast", "deep"):
        console.print(f"[red]--verify must be fast or deep, not {verify!r}[/red]")
        raise typer.Exit(2)
    cfg = load(config, set_)
    if from_stage is None and only is None and _only_reuses(cfg, until, verify):
        return
    from flows.local_api import early_local_api

    with early_local_api() as wait_ready, failures_reported(cfg.workspace):
        # While the API boots (a second process): import prefect and mlflow, and open (on a first run,
        # create) the tracking database, which the flow's first MLflow call would otherwise do.
        from components.tracking import client_for
        from flows.domain_adaptation import domain_adaptation

        client_for(cfg.tracking_uri())
        wait_ready()
        summary = domain_adaptation(config=cfg, from_stage=from_stage, only=only, until=until, verify=verify)
    _print_summary(summary)


def _only_reuses(cfg, until: str | None, verify: str) -> bool:
    """A local run whose every stage is complete on disk runs without Prefect (flows/run_core.py: it would
    only reuse, and Prefect's temporary API costs more than the rest of it). Returns whether it ran."""
    from components.models.loading import select_hardware
    from flows.run_core import cached_plan, run_cached

    if os.environ.get("PREFECT_API_URL") or os.environ.get("LMFORGE_ALWAYS_PREFECT") == "1":
        return False  # a configured server keeps every run in its history
    try:
        precision = select_hardware(cfg.compute.device, cfg.compute.precision).precision
        if not cached_plan(cfg, precision, until=until, verify=verify):
            return False
    except Exception:  # bad input: the run through Prefect reports it, with its MLflow run ended FAILED
        return False
    with failures_reported(cfg.workspace, prefect=False):
        summary = run_cached(cfg, precision, until=until, verify=verify)
    console.print("every stage is cached: reused without starting Prefect", style="dim")
    _print_summary(summary)
    return True


def comparison_rows(comparison: dict[str, dict], columns: list[str]) -> list[list[str]]:
    """The summary's metric x column table as printed rows: a metric's `_ci_low`/`_ci_high` rows fold into
    its own cells as "value [low, high]"."""
    rows = []
    for key, row in comparison.items():
        if key.endswith(("_ci_low", "_ci_high")) and key.rsplit("_ci_", 1)[0] in comparison:
            continue
        low, high = comparison.get(f"{key}_ci_low", {}), comparison.get(f"{key}_ci_high", {})
        cells = []
        for c in columns:
            cell = fmt(row.get(c))
            if low.get(c) is not None and high.get(c) is not None:
                cell += f" [{low[c]:.3f}, {high[c]:.3f}]"
            cells.append(cell)
        rows.append([key, *cells])
    return rows


def _print_summary(summary: dict) -> None:
    out = table_console()
    table = Table(title="stages")
    for col in ("stage", "status", "stage s", "task s", "peak RSS MB"):
        table.add_column(col)
    for row in summary["timeline"]:
        table.add_row(row["stage"], "cached" if row["cached"] else "ran", f"{row['stage_s']:.1f}", f"{row['task_s']:.2f}",
                      "" if row.get("peak_rss_mb") is None else f"{row['peak_rss_mb']:.0f}")
    out.print(table)
    for line in summary.get("data_changes", []):
        out.print(line, markup=False, highlight=False)
    if summary["comparison"]:
        columns = summary["columns"]
        comp = Table(title="held-out evaluation: " + " vs ".join(columns))
        for col in ("metric", *columns):
            comp.add_column(col)
        for cells in comparison_rows(summary["comparison"], columns):
            comp.add_row(*cells)
        out.print(comp)
    if summary.get("per_task_table"):
        from rich.markdown import Markdown

        out.print("[bold]per task[/bold] (95% intervals; majority baseline = always the most common answer)")
        out.print(Markdown(summary["per_task_table"]))
    alignment = summary.get("alignment") or {}
    rm = alignment.get("reward_model")
    if rm:
        out.print(f"reward model: held-out pair accuracy {fmt(rm['accuracy'])}, margin {fmt(rm['margin'])}")
    if alignment.get("method"):
        from components.run_summary import alignment_line

        out.print(alignment_line(alignment))
    for line in [*(rm or {}).get("warnings", []), *alignment.get("flags", [])]:
        out.print(f"[yellow]warning:[/yellow] {line}")
    reg = summary.get("registered") or {}
    if reg:
        out.print(f"registered [bold]{reg['name']}[/bold] version {reg['version']} as @{reg['alias']}")
    if summary.get("promotion"):
        from components.run_summary import promotion_line

        colour = "green" if summary["promotion"].get("outcome") in ("promoted", "kept") else "yellow"
        out.print(f"[{colour}]{promotion_line(summary['promotion'])}[/{colour}]", highlight=False, soft_wrap=True)
    m = summary["metrics"]
    out.print(f"flow {m['flow_wall_s']:.1f} s, stage compute {m['stage_compute_s']:.1f} s, "
              f"orchestration + tracking {m['orchestration_overhead_s']:.1f} s")


app.command()(stages)


@app.command("config-schema")
def config_schema() -> None:
    """Print the JSON schema of the pipeline config (every field, type and description)."""
    from components.config import PipelineConfig

    console.print_json(json.dumps(PipelineConfig.model_json_schema()))


@app.command()
def deploy(
    name: Annotated[list[str], typer.Option("--name", help="Only this deployment of prefect.yaml (repeatable); default: all of them.")] = [],  # noqa: B006
    write_prefect_yaml: Annotated[bool, typer.Option("--write-prefect-yaml", help="Regenerate prefect.yaml's presets from the configs/ files they name, instead of registering; run it after editing a preset.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be registered (name, flow, work pool, schedule) and register nothing.")] = False,
    prefect_yaml: Annotated[Optional[Path], typer.Option("--file", help="The deployments file; default: the repository's prefect.yaml (entrypoints are relative to the repository).")] = None,
) -> None:
    """Register prefect.yaml's deployments with the Prefect server at PREFECT_API_URL (its work pool must exist).

    Same as `python -m deployments.deploy` and `prefect deploy --all`. Then `prefect worker start --pool
    lmforge-local` runs what the schedules and the UI trigger.
    """
    # Imported here: flows/ does not depend on deployments/ (which imports the flow by its entrypoint).
    from deployments.deploy import PREFECT_YAML, PrefectAPIUnreachable, run_command

    try:
        lines = run_command(prefect_yaml or PREFECT_YAML, name, write_presets=write_prefect_yaml, dry_run=dry_run)
    except (ValueError, FileNotFoundError, PrefectAPIUnreachable) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A stage dir (.lmforge/artifacts/sft/<key>), a model dir, a .gguf file, "
                                              "embedded:smollm2-135m-instruct, models:/NAME@alias, or a registered "
                                              "variant models:/NAME@alias/VARIANT (nf4, int8, q8_0, ...).")],
    config: Annotated[Optional[Path], typer.Option(help="Config for tracking URI, template and system prompt.")] = None,
    max_new_tokens: int = 256,
    prompt_lookup: Annotated[int, typer.Option(help="Prompt-lookup decoding: propose up to this many tokens from the "
                                                    "conversation, checked in one pass (same greedy reply; 0: off).")] = 0,
    draft_model: Annotated[Optional[str], typer.Option(help="Speculative decoding with a smaller model of the same "
                                                            "family (any MODEL form), through transformers' assisted "
                                                            "generation (same greedy reply).")] = None,
    set_: SetOpt = [],  # noqa: B006
) -> None:
    """Chat with a model, streaming the answer. Empty line or Ctrl-D ends."""
    from components.chat import load_chat_model, load_draft_model, stream_reply

    cfg = load(config, set_)
    if prompt_lookup and draft_model:
        console.print("[red]choose one way to speculate: --prompt-lookup or --draft-model[/red]")
        raise typer.Exit(2)
    model_obj, tokenizer = load_chat_model(model, cfg)
    draft = load_draft_model(draft_model, cfg, tokenizer) if draft_model else None
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            console.print("[bold]you>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        console.print("[bold]model>[/bold] ", end="")
        reply = ""
        for piece in stream_reply(model_obj, tokenizer, history, cfg, max_new_tokens=max_new_tokens,
                                  prompt_lookup=prompt_lookup, draft=draft):
            reply += piece
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        history.append({"role": "assistant", "content": reply})


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Pipeline YAML: tracking URI and promotion rules (default: built-in).")]


def _registry_client(config: Path | None, overrides: list[str]):
    from components import tracking

    cfg = load(config, overrides)
    return cfg, tracking.client_for(cfg.tracking_uri())


def _print_decision(decision) -> None:
    for comparison in decision.comparisons:
        against = comparison.against + (f" version {comparison.version}" if comparison.version else "")
        table = Table(title=f"{decision.model_name} version {decision.version} vs {against}")
        for col in ("metric", "better", "margin", "challenger", comparison.against, "passes", "interval"):
            table.add_column(col)
        for ch in comparison.checks:
            table.add_row(ch.metric, ch.direction, f"{ch.margin:g}", fmt(ch.challenger), fmt(ch.reference),
                          "yes" if ch.passed else "no", ch.note)
        console.print(table)
    colour = "green" if decision.promoted or decision.outcome == "rolled_back" else "yellow"
    console.print(f"[{colour}]{decision.outcome}[/{colour}]: {decision.reason}", highlight=False, soft_wrap=True)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name (registry.model_name).")],
    version: Annotated[str, typer.Argument(help="The version to promote.")],
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Move @champion even if the rules say no (recorded as forced).")] = False,
    set_: SetOpt = [],  # noqa: B006
) -> None:
    """Run the promotion gate for one version: @champion moves only if it beats the base and the champion."""
    from components.promotion import PromotionError, champion_rescorer, promote_if_better

    cfg, client = _registry_client(config, set_)
    try:
        decision = promote_if_better(client, name, version, cfg.promotion, force=force,
                                     rescore=champion_rescorer(client, cfg, Path(cfg.workspace) / "registry-cache"))
    except PromotionError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _print_decision(decision)
    if not (decision.promoted or decision.outcome == "kept"):
        raise typer.Exit(1)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name (registry.model_name).")],
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006
) -> None:
    """Move @champion back to the version the current champion replaced."""
    from components.promotion import PromotionError
    from components.promotion import rollback as roll_back

    _, client = _registry_client(config, set_)
    try:
        decision = roll_back(client, name)
    except PromotionError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _print_decision(decision)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="models:/NAME@champion (followed as the alias moves), models:/NAME/VERSION, "
                                              "a registered variant models:/NAME@champion/VARIANT (nf4, int8, q8_0, "
                                              "...), a stage dir (.lmforge/artifacts/sft/<key>), a model dir or a .gguf file.")],
    config: ConfigOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it beyond this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the OpenAI-compatible API (…/v1).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="LMFORGE_API_KEY", show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' (prefer the env var: "
                                                        "arguments show in ps).")] = None,
    backend: Annotated[str, typer.Option(help="auto, transformers, llamacpp (.gguf) or vllm (CUDA).")] = "auto",
    follow_interval: Annotated[float, typer.Option(help="Seconds between checks of a models:/NAME@alias spec's "
                                                        "alias (0: only on POST /admin/reload).")] = 30.0,
    backend_args: Annotated[str, typer.Option(help="Arguments appended to the backend's command, quoted as one: "
                                                   "'--cb-num-blocks 64', '--quantization bnb-4bit'.")] = "",
    prompt_lookup: Annotated[int, typer.Option(help="The backend's prompt-lookup decoding, this many tokens proposed "
                                                    "(llama.cpp, vLLM; 0: off).")] = 0,
    draft_model: Annotated[Optional[str], typer.Option(help="The backend's speculative decoding with this draft "
                                                            "model (vLLM).")] = None,
    set_: SetOpt = [],  # noqa: B006
) -> None:
    """Serve a model over an OpenAI-compatible API (chat, completions, streaming), following @champion."""
    import shlex

    from rich.markup import escape

    from components.serving.backends import BackendError
    from components.serving.resolve import ServeSpecError
    from components.serving.server import serve as run_server

    cfg = load(config, set_)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_server(model, cfg, host=host, port=port, api_key=api_key or None, backend=backend,
                   follow_interval=follow_interval, backend_args=tuple(shlex.split(backend_args)),
                   prompt_lookup=prompt_lookup, draft_model=draft_model)
    except (ServeSpecError, BackendError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@data_app.command("check")
def data_check(config: ConfigArg = None, set_: SetOpt = []) -> None:  # noqa: B006
    """Fetch, align and tokenize; print the alignment report and decoded samples (trained tokens marked)."""
    cfg = load(config, set_)
    from flows.local_api import early_local_api

    with early_local_api() as wait_ready, failures_reported(cfg.workspace):
        from flows.data_check import check_data

        wait_ready()
        report, samples = check_data(cfg)
    # Verbatim: no wrapping at the terminal width (a wrapped sample shows line breaks the model never
    # sees), no markup, highlighting or :emoji: codes taken from the data.
    for text in (report, samples):
        console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


@app.command()
def plan(
    model: Annotated[Optional[str], typer.Argument(help="Base model: hub id (Qwen/Qwen2.5-7B-Instruct), local "
                                                         "directory, or embedded:smollm2-135m-instruct.")] = None,
    context_length: Annotated[int, typer.Option(help="Tokens per training sequence.")] = 2048,
    tokens_per_step: Annotated[int, typer.Option(help="Target tokens per optimizer step (global batch).")] = 65536,
    method: Annotated[str, typer.Option(help="auto, full, lora or qlora.")] = "auto",
    max_steps: Annotated[int, typer.Option(help="Optimizer steps of SFT (CPT gets a third).")] = 1000,
    gpus: Annotated[Optional[str], typer.Option(help="Plan for another server: 8x80 (8 GPUs of 80 GiB), 2x8x80 "
                                                     "(2 nodes), cpu. Default: this machine (NVML).")] = None,
    host_ram_gib: Annotated[Optional[float], typer.Option(help="Host RAM of the planned server (with --gpus).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for plan.yaml and RUN.md.")] = Path("plan"),
    ask: Annotated[Optional[str], typer.Option(help="Describe the run in a sentence; an OpenAI-compatible endpoint "
                                                    "fills the settings (without one: questions).")] = None,
    llm_base_url: Annotated[Optional[str], typer.Option(envvar="LMFORGE_LLM_BASE_URL",
                                                        help="OpenAI-compatible base URL (…/v1) for --ask; the key "
                                                             "is read from LMFORGE_LLM_API_KEY.")] = None,
    llm_model: Annotated[str, typer.Option(envvar="LMFORGE_LLM_MODEL", help="Model name at that endpoint.")] = "gpt-4o-mini",
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Answer the settings as questions.")] = False,
) -> None:
    """Recommend method, batch shape and ZeRO stage for a model on this (or another) machine; write the config."""
    from components.planner import PlanRequest, ask_llm, detect_inventory, make_plan, parse_gpus, plan_rows, write_plan
    from rich.markup import escape

    try:
        request = PlanRequest(model=model or PlanRequest().model, context_length=context_length,
                              tokens_per_step=tokens_per_step, method=method, max_steps=max_steps)
        if ask and llm_base_url:
            request = ask_llm(ask, llm_base_url, llm_model)
        elif ask or interactive:
            if ask:
                console.print(f"no --llm-base-url: answer a few questions for {escape(ask)!r}", highlight=False)
            request = _plan_questions(request)
        if gpus:
            inventory = parse_gpus(gpus, **({"host_memory_gib": host_ram_gib} if host_ram_gib else {}))
        else:
            inventory = detect_inventory()
        result = make_plan(request, inventory)
    except ValueError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    table = Table(title=f"plan: {result.shape.name}")
    table.add_column("setting")
    table.add_column("value")
    for name, value in plan_rows(result):
        table.add_row(name, value)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    config_path, readme = write_plan(result, out)
    console.print(f"wrote {config_path} and {readme}; run it with: lmforge run {config_path}", highlight=False, soft_wrap=True)


def _plan_questions(request):
    """Ask for each PlanRequest field (defaults from the options); the answers validate like the endpoint's."""
    from components.planner import PlanRequest

    answers = {name: typer.prompt(info.description or name, default=str(getattr(request, name)))
               for name, info in PlanRequest.model_fields.items()}
    return PlanRequest(**answers)


def main() -> None:  # pragma: no cover
    """`python -m flows.cli`: the same as the installed `lmforge` script (logging set up as Prefect does)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
