"""`gemtune merge`: fold a LoRA adapter into its base and prove the merged model says the same thing.

A merged model is what a team serves when one adapter takes all the traffic, or hands to an engine without LoRA
support (TGI, vLLM without --enable-lora). Merging is arithmetic (W + s·BA) but the proof matters: the merged model
is saved only if its greedy outputs on sample prompts equal the unmerged PEFT model's, token for token, computed on
the device and in the dtype the merge ran in. The comparison is printed and stored beside the weights
(`gemtune-merge.json`, with the device and dtype), with the largest logit difference on the prompts, so a reviewer
sees how close the two are, not just that they matched.

Placement follows gemtune's device policy (`gemtune.base.device`): `device` auto|cpu|cuda[:N]; `dtype` auto is the
base's own stored dtype (a bf16 base merges and is saved in bf16; fp32 where the GPU has no bf16), or bfloat16 /
float32 when asked. The output is sharded safetensors (`max_shard_size`) with the tokenizer and a chat template
(gemtune's, when the base's tokenizer has none).

In fp32 the two models agree to ~1e-6 and every greedy token must be equal. In bf16 they cannot agree to the bit
(the merged weight is rounded once, the unmerged path rounds its two products separately), so a prompt also passes
when its outputs part at a near-tie: at the first differing step, the unmerged model's own logits put the merged
model's token within `BF16_TIE` (relative to the top logit) of its choice. A merge that lost or mis-scaled the
adapter parts from it where the adapter was confident, and fails.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemtune.adapter import base_of, load_onto, weights_sha256
from gemtune.errors import GateFailed, UserError
from gemtune.utils import atomic_dir, check_out_dir, iter_jsonl

SAMPLE_PROMPTS = [
    [{"role": "user", "content": "My card payment was declined at the shop. What should I do?"}],
    [{"role": "user", "content": "How long does a bank transfer take to arrive?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 times 7?"}],
]


def load_prompts(path: str | Path | None) -> list[list[dict]]:
    """Sample prompts: JSONL rows with `messages` (a trailing assistant turn is dropped) or `prompt`."""
    if path is None:
        return SAMPLE_PROMPTS
    out = []
    for i, row in iter_jsonl(path):
        if isinstance(row.get("messages"), list):
            msgs = [m for m in row["messages"] if isinstance(m, dict)]
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
        elif isinstance(row.get("prompt"), str):
            msgs = [{"role": "user", "content": row["prompt"]}]
        else:
            raise UserError("expected 'messages' or 'prompt'", file=str(path), line=i, field="messages")
        if not msgs:
            raise UserError("no user turn", file=str(path), line=i, field="messages")
        out.append(msgs)
    if not out:
        raise UserError("no prompts", file=str(path))
    return out


WRITER = "gemtune merge"
DEFAULT_MAX_SHARD_SIZE = "5GB"
BF16_TIE = 2**-5  # a bf16 divergence passes at a near-tie: margin <= BF16_TIE * max(1, |top logit|)


def is_merge_output(d: Path) -> bool:
    """A merged-model directory written before gemtune marked its outputs (it holds gemtune-merge.json)."""
    return (d / "gemtune-merge.json").is_file()


# ------------------------------------------------------------------------------------------------ placement
def stored_dtype(base_dir: Path) -> str | None:
    """The dtype a base's weights are stored in (config.json `dtype`, or `torch_dtype` in older files)."""
    try:
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if "dtype" not in cfg and "torch_dtype" not in cfg else cfg
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return value if isinstance(value, str) else None


def merge_placement(base_dir: Path, device: str = "auto", dtype: str = "auto"):
    """Where and in which dtype to merge. dtype auto = the base's stored dtype: bf16 for a bf16 base (fp32 on a GPU
    without bf16), fp32 for an fp32 base; anything else falls back to the device policy's auto."""
    from gemtune.base.device import check_dtype_spec, gpu_supports_bf16, resolve, resolve_device

    if dtype != "auto":
        return resolve(device, dtype)
    try:
        own = check_dtype_spec(stored_dtype(base_dir) or "auto")
    except ValueError:  # fp16 or unknown: the policy decides
        own = "auto"
    dev = resolve_device(device)
    if own == "bfloat16" and dev.type == "cuda" and not gpu_supports_bf16(dev):
        own = "float32"
    place = resolve(device, own)
    return type(place)(place.device, place.dtype, place.requested_device, "auto")


def shard_bytes(size: int | str) -> int:
    """`max_shard_size` as bytes: an integer, or a size such as "5GB", "500MB", "100KB" (UserError otherwise)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = int(size) if isinstance(size, str) and size.strip().isdigit() else convert_file_size_to_int(size)
    except (ValueError, TypeError, AttributeError):
        n = 0
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"expected a size such as 5GB or 500MB, got {str(size)[:40]!r}", field="max_shard_size")
    return n


# --------------------------------------------------------------------------------------------------- parity
def _greedy(model, ids_list, stop_ids, pad_id, max_new_tokens: int) -> list[list[int]]:
    import torch

    from gemtune.base.device import model_device

    dev, outs = model_device(model), []
    with torch.inference_mode():
        for ids in ids_list:
            x = torch.tensor([ids], device=dev)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
            outs.append(y[0, len(ids):].tolist())
    return outs


def _logits(model, ids: list[int]):
    """fp32 logits of every position of `ids` (on the CPU)."""
    import torch

    from gemtune.base.device import model_device

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids], device=model_device(model))).logits[0].float().cpu()


def _near_tie(ref_row, want: int, got: int, tie: float) -> tuple[bool, float]:
    """Whether, under the unmerged model's logits `ref_row`, token `got` is within the tie tolerance of `want`."""
    margin = float(ref_row[want] - ref_row[got])
    return margin <= tie * max(1.0, float(ref_row.abs().max())), margin


def parity_rows(unmerged, merged, conversations, ids_list, before, after, tok, tie: float) -> tuple[list, float]:
    """Per prompt: equal tokens, or where they part and by what margin; and the largest |Δlogit| on the prompts.
    Both models are run teacher-forced on prompt + the unmerged output (the unmerged one before merging:
    `unmerged` holds its logits)."""
    rows, max_diff = [], 0.0
    for conv, ids, a, b, ref in zip(conversations, ids_list, before, after, unmerged):
        got = _logits(merged, ids + a)
        max_diff = max(max_diff, float((ref[: len(ids)] - got[: len(ids)]).abs().max()))
        row = {"prompt": conv[-1]["content"][:80], "equal": a == b, "tokens": len(a),
               "unmerged": tok.decode(a, skip_special_tokens=True), "merged": tok.decode(b, skip_special_tokens=True)}
        if a != b:
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            tie_ok, margin = (False, float("inf"))
            if k < min(len(a), len(b)) and len(ids) + k - 1 < ref.shape[0]:
                tie_ok, margin = _near_tie(ref[len(ids) + k - 1], a[k], b[k], tie)
            row.update(diverged_at=k, margin=margin, near_tie=tie_ok)
        row["passed"] = row["equal"] or row.get("near_tie", False)
        rows.append(row)
    return rows, max_diff


# ---------------------------------------------------------------------------------------------------- merge
def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | None = None,
                  prompts: str | Path | None = None, max_new_tokens: int = 32, progress=None,
                  overwrite: bool = False, device: str = "auto", dtype: str = "auto",
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Merge `adapter` into its base on `device` in `dtype` (auto: the base's own), check greedy parity there,
    and save sharded safetensors + tokenizer + chat template to `out`.

    Returns the parity report; raises GateFailed (exit 1) without writing `out` when outputs differ.
    `out` is replaced whole: it must be missing, empty or a gemtune output unless `overwrite`, and neither the
    adapter, the prompts nor a local base may lie inside it (checked before any model is loaded).
    """
    import torch

    from gemtune.base.families import family_of
    from gemtune.base.loader import load_base
    from gemtune.base.provision import pull
    from gemtune.base.templates import render_prompt, stop_token_ids
    from gemtune.registry.store import inspect_adapter

    say = progress or (lambda msg: None)
    adapter, out = Path(adapter).expanduser(), Path(out).expanduser()
    local_base = [Path(base).expanduser()] if base and Path(base).expanduser().exists() else []
    guard = {"writer": WRITER, "overwrite": overwrite, "recognise": is_merge_output,
             "inputs": [adapter, *([Path(prompts)] if prompts else []), *local_base]}
    check_out_dir(out, **{k: v for k, v in guard.items() if k != "writer"})
    max_shard_size = shard_bytes(max_shard_size)
    _, _, problems, _ = inspect_adapter(adapter)
    base_ref = base_of(adapter, base)
    conversations = load_prompts(prompts)
    place = merge_placement(pull(base_ref), device, dtype)
    say(f"loading base {base_ref} ({place.dtype_name} on {place.device})")
    model, tok = load_base(base_ref, placement=place)
    fam = family_of(model)
    ids_list = [render_prompt(m, tok, fam).input_ids for m in conversations]
    stops = stop_token_ids(tok, fam)
    peft_model = load_onto(model, adapter, base=base_ref)
    say("generating with the unmerged adapter")
    before = _greedy(peft_model, ids_list, stops, tok.pad_token_id, max_new_tokens)
    unmerged = [_logits(peft_model, ids + a) for ids, a in zip(ids_list, before)]
    merged = peft_model.merge_and_unload().eval()
    say("generating with the merged model")
    after = _greedy(merged, ids_list, stops, tok.pad_token_id, max_new_tokens)
    tie = 0.0 if place.dtype == torch.float32 else BF16_TIE
    rows, max_diff = parity_rows(unmerged, merged, conversations, ids_list, before, after, tok, tie)
    report = {"adapter": str(adapter.resolve()), "base": base_ref,
              "adapter_sha256": weights_sha256(adapter), "dtype": place.dtype_name,
              "device": str(place.device), "placement": place.describe(), "max_new_tokens": max_new_tokens,
              "parity": all(r["passed"] for r in rows), "exact": all(r["equal"] for r in rows),
              "near_tie_tolerance": tie, "max_abs_logit_diff": max_diff, "prompts": rows, "compat_notes": problems}
    if not report["parity"]:
        report["saved"] = False
        raise _ParityFailed(report)
    say(f"saving merged model to {out}")
    report["files"] = _save(merged, tok, fam, out, guard, report, max_shard_size)
    report["saved"] = True
    report["out"] = str(out)
    return report


def _save(merged, tok, fam, out: Path, guard: dict, report: dict, max_shard_size) -> list[str]:
    """Sharded safetensors in the merge dtype, the tokenizer with a chat template, and the report; atomically."""
    from gemtune.serve.chat_template import ensure_chat_template

    with atomic_dir(out, **guard) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        report["chat_template"] = "gemtune" if ensure_chat_template(tok, fam) else "tokenizer"
        tok.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir() if p.name.endswith(".safetensors"))
        (tmp / "gemtune-merge.json").write_text(json.dumps({**report, "files": files, "saved": True}, indent=2))
    return files


class _ParityFailed(GateFailed):
    def __init__(self, report: dict):
        bad = [r for r in report["prompts"] if not r["passed"]]
        super().__init__(f"merged model differs from the unmerged adapter on {len(bad)} of "
                         f"{len(report['prompts'])} prompts ({report['dtype']} on {report['device']}, max |Δlogit| "
                         f"{report['max_abs_logit_diff']:.3g}); nothing was written")
        self.report = report
