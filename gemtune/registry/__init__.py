"""Registry: immutable sha256-verified adapter versions (store) and aliases / A-B splits / rollback (routes).

Modules, each importing only those before it: names.py (adapter names, versions, aliases, weights), history.py
(the routes.json document: route history and audit log), store.py (versions on disk; a push is logged in
routes.json), routes.py (promote/split/rollback, the server's RouteWatcher), listing.py (what `registry list`
shows), synthetic.py (random adapters for tests and benchmarks).
"""

from gemtune.registry.routes import DEFAULT_ALIAS, ModelRef, RouteTable, RouteWatcher, parse_model, parse_split
from gemtune.registry.store import CorruptAdapter, Registry, VersionInfo, inspect_adapter, validate_name

__all__ = ["DEFAULT_ALIAS", "CorruptAdapter", "ModelRef", "Registry", "RouteTable", "RouteWatcher", "VersionInfo",
           "inspect_adapter", "parse_model", "parse_split", "validate_name"]
