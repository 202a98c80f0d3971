"""`lmforge stages` and `lmforge cache`: what a run would reuse, here and in the stage store shared by machines."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from flows.cli_common import ConfigArg, SetOpt, console, failures_reported, load, table_console

cache_app = typer.Typer(no_args_is_help=True, help="The stage store shared by machines (cache.shared_url).")


def stages(
    config: ConfigArg = None,
    verify: Annotated[str, typer.Option(help="fast (sizes, mtimes) or deep (rehash every file).")] = "fast",
    set_: SetOpt = [],  # noqa: B006
) -> None:
    """List each stage with its cache key, whether its output is cached here and, with a shared store, there."""
    from components.models.loading import select_hardware

    cfg = load(config, set_)
    hw = select_hardware(cfg.compute.device, cfg.compute.precision)
    with failures_reported(cfg.workspace):
        rows, shared = _plan_with_store(cfg, hw.precision, deep=verify == "deep")
    table = Table(title=f"stages ({cfg.workspace})")
    columns = [("stage", "stage"), ("kind", "kind"), ("cache key", "key"), ("cached", None)]
    columns += [("shared", None)] if shared is not None else []
    for col, field in (*columns, ("note", "note")):
        # Never cut: names and keys are what people copy from this table.
        width = max([len(col)] + [len(str(r[field] or "")) for r in rows if field])
        table.add_column(col, no_wrap=True, min_width=width)
    table.add_column("what it does")
    for row in rows:
        cells = [row["stage"], row["kind"], row["key"] or "-", "yes" if row["cached"] else "no"]
        cells += [shared[row["stage"]]] if shared is not None else []
        table.add_row(*cells, row["note"], row["summary"])
    table_console().print(table)


# `lmforge stages`' shared column: what a run would find in the store for each key.
SHARED_CELL = {"complete": "yes", "absent": "no", "incomplete": "incomplete", None: "-"}


def _plan_with_store(cfg, precision: str, deep: bool) -> tuple[list[dict], dict[str, str] | None]:
    """describe_plan's rows, keyed through the shared store where one is set (a stage complete only there
    keys its downstream stages), and stage -> the store's cell (None without a store; `?` where it could not be
    read: the local table still stands)."""
    from rich.markup import escape

    from components.shared_cache import open_store
    from flows.plan import SharedStoreUnreadable, describe_plan

    def unreadable(exc: Exception) -> tuple[list[dict], dict[str, str]]:
        console.print(f"[yellow]warning:[/yellow] could not read the shared store: {escape(f'{type(exc).__name__}: {exc}')}",
                      highlight=False, soft_wrap=True)
        rows = describe_plan(cfg, precision, deep=deep)
        return rows, {r["stage"]: "?" for r in rows}

    try:
        store = open_store(cfg.cache.shared_url, cfg.cache.lease_ttl_s)
    except Exception as exc:  # no s3fs, a URL fsspec does not know
        return unreadable(exc)
    if store is None:
        return describe_plan(cfg, precision, deep=deep), None
    console.print(f"shared store: {escape(store.url)}", highlight=False, soft_wrap=True)
    try:
        rows = describe_plan(cfg, precision, deep=deep, store=store)
    except SharedStoreUnreadable as exc:
        return unreadable(exc.__cause__ or exc)
    return rows, {r["stage"]: SHARED_CELL[r["shared"]] for r in rows}


@cache_app.command("prune")
def cache_prune(
    config: ConfigArg = None,
    older_than: Annotated[Optional[str], typer.Option("--older-than", help="Remove entries published longer ago than this: 30d, 12h, 90m, 2w.")] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", min=0, help="Keep only the newest N entries of each stage (with --older-than: remove only what both let go).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed and the bytes it frees; remove nothing.")] = False,
    set_: SetOpt = [],  # noqa: B006
) -> None:
    """Clean the shared stage store: old entries, leftover partial uploads, dead leases (docs/shared_cache.md).

    An entry a worker holds the lease of stays. Manifests go before files: no reader takes a half-removed entry.
    """
    from rich.markup import escape

    from components.shared_cache import ENV_URL, open_store
    from components.shared_cache_prune import parse_duration, plan_prune, prune

    try:
        older_than_s = None if older_than is None else parse_duration(older_than)
    except ValueError as exc:
        console.print(f"[red]--older-than: {escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    cfg = load(config, set_)
    store = open_store(cfg.cache.shared_url, cfg.cache.lease_ttl_s)
    if store is None:
        console.print(f"[red]no shared store to prune: set cache.shared_url in the config (or --set "
                      f"cache.shared_url=URL), or {ENV_URL}=URL in the environment[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    plan = plan_prune(store, older_than_s=older_than_s, keep=keep)
    done = plan if dry_run else prune(store, plan)
    _print_prune(store.url, done, dry_run)


def _print_prune(url: str, done, dry_run: bool) -> None:
    """The entries removed (or that would be) as a table, then one line of totals and one per kept entry."""
    import time

    from rich.markup import escape

    verb = "would remove" if dry_run else "removed"
    if done.entries:
        table = Table(title=f"{verb} from {escape(url)}")
        for col in ("stage", "cache key", "published", "size", "why"):
            table.add_column(col, no_wrap=col != "why")
        for entry, why in done.entries:
            table.add_row(entry.stage, entry.key, time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified)),
                          _size(entry.bytes), why)
        table_console().print(table)
    counts = ", ".join(f"{len(items)} {one if len(items) == 1 else many}" for items, one, many in (
        (done.entries, "entry", "entries"), (done.blobs, "blob", "blobs"),
        (done.partials, "partial upload", "partial uploads"), (done.leases, "dead lease record", "dead lease records")))
    console.print(f"{verb} {counts} from {escape(url)}: "
                  f"{'would free' if dry_run else 'freed'} {_size(done.freed_bytes)}", highlight=False, soft_wrap=True)
    for entry in done.protected:
        console.print(f"kept {entry.stage} {entry.key}: a worker holds its lease", highlight=False, soft_wrap=True)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
