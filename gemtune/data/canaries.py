"""Canaries: random secrets planted in training rows so the privacy probe can measure memorisation.

Carlini et al. (2019) "The Secret Sharer": plant a secret of a known format (e.g. "my account code is
7Q4-XK2-881"), train, then rank the true secret among R random candidates of the same format by model likelihood;
exposure = log2 R − log2 rank. The secrets are recorded *outside* the dataset directory (default
`<out>.canaries.json` beside it) so nothing that ships with the dataset reveals them.

Format strings: `#` a digit, `A` an upper-case letter, `*` an upper-case letter or digit, anything else literal.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from gemtune.errors import UserError

DEFAULT_FORMAT = "***-***-###"
DEFAULT_PREFIX = "my account code is"
ALPHABET = {"#": "0123456789", "A": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "*": "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"}


def random_secret(fmt: str, rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET[c]) if c in ALPHABET else c for c in fmt)


def space_size(fmt: str) -> int:
    """How many distinct secrets the format allows (the exposure upper bound is log2 of this)."""
    n = 1
    for c in fmt:
        n *= len(ALPHABET.get(c, "x"))
    return n


def candidates(fmt: str, count: int, seed: int = 0, exclude: tuple[str, ...] = ()) -> list[str]:
    """`count` distinct random secrets of the format, none equal to an excluded (true) secret."""
    if count > space_size(fmt) - len(exclude):
        raise ValueError("more candidates requested than the format allows")
    rng = random.Random(f"candidates:{seed}")
    out, seen = [], set(exclude)
    while len(out) < count:
        s = random_secret(fmt, rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def default_canary_path(out_dir: str | Path) -> Path:
    out = Path(out_dir).resolve()
    return out.with_name(out.name + ".canaries.json")


def plant(train: list[dict], eligible: list[int], n: int, seed: int, *, fmt: str = DEFAULT_FORMAT,
          prefix: str = DEFAULT_PREFIX) -> list[dict]:
    """Append "<prefix> <secret>" to the last assistant turn of n eligible train records (mutated in place).

    The secret goes into the assistant turn because only assistant tokens are trained on: a secret in the prompt
    would never be learned, and the probe would measure nothing.
    """
    from gemtune.data.records import content_sha256

    if n > len(eligible):
        raise UserError(f"--canaries {n} exceeds the {len(eligible)} domain train rows available", field="canaries")
    rng = random.Random(f"canary:{seed}")
    chosen = rng.sample(eligible, n)
    entries, used = [], set()
    for idx in chosen:
        secret = random_secret(fmt, rng)
        while secret in used:
            secret = random_secret(fmt, rng)
        used.add(secret)
        rec = train[idx]
        turn = max(i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant")
        text = f"{prefix} {secret}"
        rec["messages"][turn]["content"] = rec["messages"][turn]["content"] + "\n" + text
        rec["sha256"] = content_sha256(rec["task"], rec["messages"], rec.get("label"), rec.get("schema"), rec.get("tools"))
        entries.append({"secret": secret, "row_id": rec["id"], "turn": turn, "prefix": prefix, "text": text,
                        "format": fmt})
    return entries


def canary_document(entries: list[dict], dataset_dir: str | Path, fmt: str = DEFAULT_FORMAT) -> dict:
    return {"version": 1, "dataset": str(Path(dataset_dir).resolve()), "format": fmt,
            "alphabet": ALPHABET, "space_size": space_size(fmt), "canaries": entries}


def load_canaries(path: str | Path) -> dict:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read canaries: {e}", file=str(p)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("canaries"), list):
        raise UserError("not a canaries file", file=str(p), field="canaries")
    return doc


def find_canary_file(dataset_dir: str | Path, meta: Optional[dict] = None) -> Optional[Path]:
    """Where a dataset's canaries were recorded: dataset.json's pointer, else the default beside the directory."""
    if meta and (c := meta.get("canaries")) and c.get("file"):
        p = Path(c["file"])
        if p.is_file():
            return p
    p = default_canary_path(dataset_dir)
    return p if p.is_file() else None
