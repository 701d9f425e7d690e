"""Base models: provisioning the embedded default, loading, chat templates and per-family facts."""

from gemtune.base.families import Family, family_for, family_of, target_modules
from gemtune.base.provision import DEFAULT_MODEL, gemtune_home, pull

__all__ = ["DEFAULT_MODEL", "Family", "family_for", "family_of", "gemtune_home", "pull", "target_modules"]
