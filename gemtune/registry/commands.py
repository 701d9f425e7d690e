"""`gemtune registry --root DIR [--routes redis://…] push|list|promote|rollback|split`: CLI wiring over store.py,
routes.py (routes in routes.json, or in the Redis store gateways share: routes_redis.py), listing.py."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from gemtune.registry.listing import list_versions
from gemtune.registry.routes import DEFAULT_ALIAS, RouteTable, parse_split
from gemtune.registry.store import Registry

console = Console()


def register(app: typer.Typer) -> None:
    reg = typer.Typer(help="Versioned adapter registry: push, list, promote, split (A/B), rollback.",
                      no_args_is_help=True)
    app.add_typer(reg, name="registry")
    state: dict = {}

    @reg.callback()
    def _root(root: str = typer.Option(..., "--root", help="Registry directory (created on first push)."),
              routes: Optional[str] = typer.Option(None, "--routes", help="Where routes live: file (routes.json, "
                                                   "the default) or redis://HOST:PORT/DB, the store `gemtune serve "
                                                   "--routes` gateways share.")):
        state["root"], state["routes"] = root, routes

    def _registry(create: bool = False) -> Registry:
        return Registry(state["root"], create=create)

    def _table(reg: Registry, **kw) -> RouteTable:
        from gemtune.registry.routes_redis import route_source

        return RouteTable(reg, source=route_source(state.get("routes"), reg), **kw)

    @reg.command("push")
    def push(name: str = typer.Argument(..., help="Adapter name (lower-case, digits, . _ -)."),
             path: str = typer.Argument(..., help="PEFT adapter directory."),
             force: bool = typer.Option(False, "--force", help="Push despite compatibility or gate problems or a "
                                        "missing eval verdict; recorded in the manifest and the audit log."),
             note: Optional[str] = typer.Option(None, "--note", help="Free text stored in the manifest.")):
        """Copy an adapter into the next immutable version NAME/vN with a sha256 manifest. Needs a passing eval
        verdict for these weights (`gemtune eval --adapter DIR --suite … --record`); exit 1 without one."""
        vi = _registry(create=True).push(name, path, force=force, note=note)
        if vi.manifest.get("forced"):
            console.print(f"[yellow]forced:[/yellow] {'; '.join(vi.manifest['forced_reasons'])}", highlight=False)
        console.print(f"pushed [bold]{vi.ref}[/bold] → {vi.path}", highlight=False)
        print(vi.ref)

    @reg.command("list")
    def list_(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
        """Every adapter version and the aliases that route to it."""
        reg_ = _registry()
        listing = list_versions(reg_, _table(reg_).read())
        if as_json:
            print(json.dumps(listing, indent=2))
            return
        t = Table("adapter", "rank", "targets", "pushed", "aliases (weight)", "forced")
        for row in listing["versions"]:
            al = ", ".join(f"{a} ({w})" for a, w in row["aliases"].items())
            t.add_row(row["ref"], str(row["rank"]), ",".join(row["target_modules"] or []) if isinstance(
                row["target_modules"], list) else str(row["target_modules"]), row["pushed_at"] or "", al,
                "yes" if row["forced"] else "")
        console.print(t)

    def _routes(force: bool) -> RouteTable:
        reg = _registry()
        return _table(reg, check=reg.route_check(force=force))

    def _routed(name: str, alias: str, out: dict) -> None:
        entry = _table(_registry()).get(name, alias) or {}
        if entry.get("forced"):
            console.print(f"[yellow]forced:[/yellow] {'; '.join(entry.get('forced_reasons') or [])}", highlight=False)
        console.print(f"{name}@{alias} → {out['weights']}", highlight=False)

    route_force = typer.Option(False, "--force", help="Route a version that has no passing eval verdict against "
                               "what the alias serves now; recorded on the route, in its history and the audit log.")

    @reg.command("promote")
    def promote(name: str = typer.Argument(...), version: str = typer.Argument(..., help="vN or N."),
                alias: str = typer.Option(DEFAULT_ALIAS, "--alias", help="Alias to point at VERSION."),
                force: bool = route_force):
        """Route 100% of an alias to one version (verifies its sha256 first). The version needs a passing eval
        verdict against what the alias serves now (`--baseline registry:NAME@ALIAS`); exit 1 without one."""
        _routed(name, alias, _routes(force).promote(name, version, alias))

    @reg.command("split")
    def split(name: str = typer.Argument(...),
              weights: List[str] = typer.Argument(..., help="VERSION=WEIGHT pairs, e.g. v3=90 v4=10."),
              alias: str = typer.Option(DEFAULT_ALIAS, "--alias"), force: bool = route_force):
        """A/B split an alias over versions by weight, sticky per request `user`. A version the alias does not
        serve yet needs a passing eval verdict against one it serves (as promote)."""
        _routed(name, alias, _routes(force).split(name, alias, parse_split(weights)))

    @reg.command("rollback")
    def rollback(name: str = typer.Argument(...), alias: str = typer.Option(DEFAULT_ALIAS, "--alias")):
        """Restore the alias's previous route; repeat to walk further back."""
        out = _table(_registry()).rollback(name, alias)
        console.print(f"{name}@{alias} → {out['weights']} (history left: {out['history_depth']})", highlight=False)
