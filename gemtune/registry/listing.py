"""What `gemtune registry list` shows: every stored version with the aliases that route traffic to it."""

from __future__ import annotations

from gemtune.registry.history import read_routes
from gemtune.registry.store import Registry


def list_versions(registry: Registry, routes_doc: dict | None = None) -> dict:
    """{"versions": [manifest summary + "aliases": {alias: weight}], "routes": {name: {alias: weights}}}.

    A version's `aliases` names every alias of its adapter that gives it a positive weight (the document
    `registry list --json` prints). `routes_doc`: the route document when routes live elsewhere than routes.json
    (a shared Redis store)."""
    rows = registry.list()
    routes = (routes_doc if routes_doc is not None else read_routes(registry.routes_path))["routes"]
    for row in rows:
        row["aliases"] = {a: e["weights"][row["version"]] for a, e in routes.get(row["name"], {}).items()
                          if e["weights"].get(row["version"])}
    return {"versions": rows, "routes": {n: {a: e["weights"] for a, e in al.items()} for n, al in routes.items()}}
