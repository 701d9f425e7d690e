"""Registry: immutable sha256-verified adapter versions (store) and aliases / A-B splits / rollback (routes)."""

from gemtune.registry.routes import DEFAULT_ALIAS, ModelRef, RouteTable, RouteWatcher, parse_model, parse_split
from gemtune.registry.store import CorruptAdapter, Registry, VersionInfo, inspect_adapter, validate_name

__all__ = ["DEFAULT_ALIAS", "CorruptAdapter", "ModelRef", "Registry", "RouteTable", "RouteWatcher", "VersionInfo",
           "inspect_adapter", "parse_model", "parse_split", "validate_name"]
