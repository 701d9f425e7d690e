"""What a candidate is gated against: a `--baseline` spec resolved to something that can produce results.

Specs:
- `base`: the candidate's base model, no adapter (`base:<base name or dir>`);
- an adapter directory (`adapter:<weights sha256>`);
- a saved `results.json` or its directory (`results:<sha256 of the file>`);
- `registry:NAME@ALIAS`: the version live under an alias of a registry (`registry:NAME@vN`), its files sha256-verified
  against the manifest before they are used; under an A/B split the version with the largest weight (and the
  name says so); `registry:NAME@vN` pins a version;
- `openai:URL#MODEL`: any OpenAI-compatible chat endpoint (`openai:URL#MODEL`, see external.py);
- `none`: no baseline, no gate; `auto`: `eval.gate_baseline` (its own `auto`: the project's live version, `eval.live`
  in `eval.registry`, when that alias routes somewhere, else the base).

The registry directory: `--registry`, else `$GEMTUNE_REGISTRY`, else `eval.registry`. The registry is imported
inside functions only: the registry may read `gemtune.evals.verdicts`, and neither package may need the other
half-initialised at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gemtune.adapter import ADAPTER_CONFIG, check_adapter_dir, weights_sha256
from gemtune.errors import UserError
from gemtune.evals.cache import adapter_fingerprint
from gemtune.evals.compare import load_results
from gemtune.evals.config import EvalConfig
from gemtune.utils import sha256_file

REGISTRY_ENV = "GEMTUNE_REGISTRY"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
SPECS = "base, an adapter dir, a results.json, registry:NAME@ALIAS, openai:URL#MODEL or none"


@dataclass
class ExternalOptions:
    """How an `openai:` baseline is called: key from `key_env` (None: $OPENAI_API_KEY when set, else no key, as
    a local server needs none), at most `concurrency` requests in flight, `retries` tries per case with
    exponential backoff from `backoff_s`; `price` = USD per 1M (input, output) tokens."""

    key_env: Optional[str] = None
    concurrency: int = 4
    retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 120.0
    price: Optional[tuple[float, float]] = None


@dataclass
class Baseline:
    """A resolved spec: `id` is stable and comparable (what a verdict records), `name` what lines and reports show."""

    spec: str
    kind: str  # base | adapter | results | registry | openai
    id: str
    name: str
    adapter: Optional[Path] = None  # adapter and registry kinds
    results: Optional[dict] = None  # results kind
    url: Optional[str] = None  # openai kind
    model: Optional[str] = None
    note: Optional[str] = None  # e.g. which arm of an A/B split was taken

    def to_json(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "id": self.id, "name": self.name, "note": self.note}


def parse_price(text: Optional[str], flag: str = "price") -> Optional[tuple[float, float]]:
    """`IN,OUT` (USD per 1M input and output tokens) → (IN, OUT); None stays None."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 2 or any(v < 0 or v != v for v in vals):
        raise UserError(f"--{flag.replace('_', '-')} {text!r}: expected IN,OUT in USD per 1M input and output "
                        "tokens, e.g. 0.15,0.60", field=flag)
    return vals  # type: ignore[return-value]


def registry_dir(explicit: Optional[str] = None, config: Optional[EvalConfig] = None) -> Optional[str]:
    """Where registry: specs are looked up: --registry, else $GEMTUNE_REGISTRY, else eval.registry."""
    return explicit or os.environ.get(REGISTRY_ENV) or (config.registry if config else None) or None


def _split_ref(ref: str, spec: str) -> tuple[str, str]:
    name, _, alias = ref.partition("@")
    if not name or not alias or "@" in alias:
        raise UserError(f"baseline {spec!r}: expected registry:NAME@ALIAS (e.g. registry:support-router@prod) "
                        "or registry:NAME@vN", field="baseline")
    return name, alias


def live_weights(root: str, name: str, alias: str) -> Optional[dict[str, int]]:
    """The weights `NAME@ALIAS` routes to in the registry at `root`; None when the alias routes nowhere."""
    from gemtune.registry.routes import RouteTable
    from gemtune.registry.store import Registry

    entry = RouteTable(Registry(root, create=False)).get(name, alias)
    weights = (entry or {}).get("weights") or {}
    return {v: int(w) for v, w in weights.items() if int(w) > 0} or None


def _pick_arm(weights: dict[str, int]) -> tuple[str, Optional[str]]:
    """The version with the largest weight (ties: the newest) and, for a split, a note saying so."""
    from gemtune.registry.names import version_number

    v = max(weights, key=lambda k: (weights[k], version_number(k)))
    if len(weights) == 1:
        return v, None
    total = sum(weights.values())
    others = ", ".join(f"{k} {100 * w / total:.0f}%" for k, w in sorted(weights.items()) if k != v)
    return v, f"A/B split: gating against {v} ({100 * weights[v] / total:.0f}% of traffic; also {others})"


def resolve_registry(spec: str, root: Optional[str]) -> Baseline:
    """`registry:NAME@ALIAS` (or `@vN`) → the version's verified directory."""
    from gemtune.registry.names import VERSION_RE, normalize_version
    from gemtune.registry.store import Registry

    name, alias = _split_ref(spec[len("registry:"):], spec)
    if not root:
        raise UserError(f"baseline {spec!r} needs a registry: pass --registry DIR, set ${REGISTRY_ENV}, or set "
                        "eval.registry in gemtune.yaml", field="registry")
    reg = Registry(root, create=False)
    note = None
    if VERSION_RE.match(alias):
        version, label = normalize_version(alias), None
    else:
        weights = live_weights(root, name, alias)
        if not weights:
            known = ", ".join(sorted(_aliases(root, name))) or "none"
            raise UserError(f"baseline {spec!r}: alias {name}@{alias} routes nowhere in this registry "
                            f"(aliases of {name}: {known})", file=str(reg.root), field="baseline")
        version, note = _pick_arm(weights)
        label = f"live as {alias}" + (", A/B largest arm" if note else "")
    vi = reg.verify(name, version)  # every file against its manifest sha256: a corrupt version is refused here
    ref = f"{name}@{vi.version}"
    return Baseline(spec, "registry", f"registry:{ref}", f"registry:{ref}" + (f" ({label})" if label else ""),
                    adapter=vi.path, note=note)


def _aliases(root: str, name: str) -> list[str]:
    from gemtune.registry.routes import RouteTable
    from gemtune.registry.store import Registry

    return list(RouteTable(Registry(root, create=False)).read()["routes"].get(name, {}))


def parse_openai(spec: str) -> tuple[str, str]:
    """`openai:URL#MODEL` → (URL, MODEL)."""
    url, sep, model = spec[len("openai:"):].rpartition("#")
    if not sep or not url or not model or not url.startswith(("http://", "https://")):
        raise UserError(f"baseline {spec!r}: expected openai:URL#MODEL, e.g. openai:http://127.0.0.1:8000/v1#my-model",
                        field="baseline")
    return url, model


def auto_spec(config: Optional[EvalConfig], registry: Optional[str] = None,
              note=None) -> str:
    """`eval.gate_baseline` resolved: an explicit spec as is; `auto` → `registry:<eval.live>` when that alias
    routes somewhere in the registry, else `base` (`note(msg)` is told why the live version was not used)."""
    cfg = config or EvalConfig()
    if cfg.gate_baseline != "auto":
        return cfg.gate_baseline
    root = registry_dir(registry, cfg)
    if not cfg.live:
        return "base"
    if not root:
        if note:
            note(f"eval.live is {cfg.live} but no registry is known (--registry, ${REGISTRY_ENV}, eval.registry): "
                 "gating against the base")
        return "base"
    name, alias = _split_ref(cfg.live, f"registry:{cfg.live}")
    if not Path(root).is_dir() or live_weights(root, name, alias) is None:
        if note:
            note(f"{cfg.live} routes nowhere in {root} yet: gating against the base")
        return "base"
    return f"registry:{cfg.live}"


def resolve_baseline(spec: Optional[str], *, base_name: str, has_adapter: bool = True,
                     registry: Optional[str] = None, config: Optional[EvalConfig] = None,
                     note=None) -> Optional[Baseline]:
    """A `--baseline` spec → `Baseline`, or None for no gate. Everything a user can get wrong (a missing file, an
    alias that routes nowhere, a corrupt registry version, a malformed URL) is a UserError here, before any model
    is loaded."""
    spec = "auto" if spec is None else str(spec).strip()
    if spec == "auto":
        if not has_adapter:
            return None
        spec = auto_spec(config, registry, note)
    if spec in ("none", ""):
        return None
    if spec == "base":
        return Baseline(spec, "base", f"base:{base_name}", "base")
    if spec.startswith("registry:"):
        return resolve_registry(spec, registry_dir(registry, config))
    if spec.startswith("openai:"):
        url, model = parse_openai(spec)
        return Baseline(spec, "openai", f"openai:{url}#{model}", f"openai:{model}", url=url, model=model)
    p = Path(spec).expanduser()
    if (p.is_file() and p.suffix == ".json") or (p.is_dir() and (p / "results.json").is_file()
                                                 and not (p / ADAPTER_CONFIG).is_file()):
        doc = load_results(p)
        return Baseline(spec, "results", f"results:{sha256_file(Path(doc['meta']['results_path']))}",
                        str(doc["meta"]["name"]), results=doc)
    if spec.endswith(".json"):
        raise UserError("baseline results file not found", file=spec, field="baseline")
    if not p.exists() and ":" in spec.split("/")[0]:
        raise UserError(f"unknown baseline {spec!r}: expected {SPECS}", field="baseline")
    d = check_adapter_dir(p, field="baseline")
    return Baseline(spec, "adapter", f"adapter:{weights_sha256(d) or adapter_fingerprint(d)}", d.name, adapter=d)
