"""``cxr cache``: what the decoded-image and feature caches hold, and clearing them."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from cxrkit.cache import readable_size

app = typer.Typer(invoke_without_command=True, no_args_is_help=False)


@app.callback()
def cache(ctx: typer.Context) -> None:
    """Show (the default) or clear the decoded-image and feature caches in $CXR_CACHE_DIR (~/.cache/cxrkit);
    runs rebuild what they need."""
    if ctx.invoked_subcommand is None:
        show(as_json=False)


@app.command("list")
def show(as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON")) -> None:
    """List the entries, most recently used first, with their sizes and the total."""
    from cxrkit.cache import KINDS, default_weights_dir, scan, weights_files
    from cxrkit.data.decoded import cache_root

    root = cache_root()
    entries = scan(root)
    if as_json:
        print(json.dumps({"root": str(root), "entries": [e.to_dict() for e in entries],
                          "bytes": sum(e.size for e in entries)}, indent=2))
        return
    from rich.console import Console

    console = Console()
    if entries:
        _print_entries(console, entries, f"cache entries in {root}")
    for kind in KINDS:
        mine = [e for e in entries if e.kind == kind]
        console.print(f"{kind}: {_entries(mine)}", highlight=False)
    weights = weights_files()
    if weights:
        console.print(f"weights: {len(weights)} file(s), {readable_size(sum(p.stat().st_size for p in weights))} in "
                      f"{default_weights_dir()} (`cxr cache clear` leaves them)", highlight=False)
    if not entries:
        where = " (a file, not a folder: see $CXR_CACHE_DIR)" if root.exists() and not root.is_dir() else ""
        console.print(f"no cache entries in {root}{where}", highlight=False)
    else:
        console.print(f"total: {readable_size(sum(e.size for e in entries))}", highlight=False)


@app.command("clear")
def clear(
    kind: Optional[str] = typer.Option(None, "--kind", help="Only this kind: decoded or features"),
    older_than: Optional[str] = typer.Option(None, "--older-than", help="Only entries unused for this long: "
                                             "30d, 12h, 2w, 90min"),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Then remove the least recently used until "
                                           "the rest take at most this: 5GB, 500MB, 2GiB"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing"),
) -> None:
    """Remove entries (all of them, without options), and what interrupted writes left; never one being written."""
    from rich.console import Console

    from cxrkit.cache import KINDS, parse_age, parse_size, remove, scan, select
    from cxrkit.data.decoded import cache_root
    from cxrkit.errors import CxrError

    if kind is not None and kind not in KINDS:
        raise CxrError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    age = parse_age(older_than) if older_than is not None else None
    limit = parse_size(max_size) if max_size is not None else None
    console = Console()
    root = cache_root()
    entries = scan(root)
    chosen = select(entries, [kind] if kind else None, age, limit)
    busy = [e for e in entries if e.busy is not None and (kind is None or e.kind == kind)]
    if dry_run:
        if chosen:
            _print_entries(console, chosen, "would remove")
        console.print(f"would remove {_entries(chosen)}", highlight=False)
        return
    problems: list[str] = []
    removed = []  # only the entries whose every file went: a read-only cache keeps them all
    for entry in chosen:
        failed = remove(entry)
        problems += failed
        removed += [] if failed else [entry]
    left = scan(root)
    console.print(f"removed {_entries(removed)}; {len(left)} left, {readable_size(sum(e.size for e in left))}",
                  highlight=False)
    for entry in busy:
        console.print(f"kept {entry.kind}/{entry.key}: {entry.status}", highlight=False)
    if problems:
        raise CxrError(f"could not remove {len(problems)} file(s): {problems[0]}")


def _print_entries(console, entries: list, title: str) -> None:
    """A table where the terminal is wide enough, else two lines per entry (a table would squeeze "what" to a
    letter per line)."""
    if console.width >= 100:
        console.print(_table(entries, title))
        return
    console.print(title, highlight=False)
    for e in entries:
        images = (e.meta or {}).get("images")
        console.print(f"{e.kind} {e.key[:8]}  {readable_size(e.size)}"
                      + (f"  {images} images" if images is not None else "") + f"  {_ago(e.last_used)}"
                      + ("" if e.status == "complete" else f"  {e.status}"),
                      highlight=False)
        console.print(f"  {e.describe()}", highlight=False)


def _table(entries: list, title: str):
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    columns = ["kind", "key", "size", "images", "last used", "what"]
    if any(e.status != "complete" for e in entries):
        columns.append("status")
    for column in columns:
        table.add_column(column, justify="right" if column in ("size", "images") else "left",
                         no_wrap=column not in ("what", "status"), overflow="fold")
    for e in entries:
        images = (e.meta or {}).get("images")
        row = [e.kind, e.key[:8], readable_size(e.size), "" if images is None else str(images), _ago(e.last_used),
               e.describe(), e.status]
        table.add_row(*row[: len(columns)])
    return table


def _entries(entries: list) -> str:
    """``"3 entries, 1.2 MiB"``."""
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {readable_size(sum(e.size for e in entries))}"


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return "just now"
