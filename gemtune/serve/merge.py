"""`gemtune merge`: fold a LoRA adapter into its base and prove the merged model says the same thing.

A merged model is what a team serves when one adapter takes all the traffic, or hands to an engine without LoRA
support (TGI, vLLM without --enable-lora). Merging is arithmetic (W + s·BA) but the proof matters: the merged model
is saved only if its greedy outputs on sample prompts equal the unmerged PEFT model's, in fp32, token for token.
The comparison is printed and stored beside the weights (`gemtune-merge.json`), with the largest logit
difference on the prompts, so a reviewer sees how close the two are, not just that they matched.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemtune.errors import GateFailed, UserError
from gemtune.utils import atomic_dir, check_out_dir, iter_jsonl, sha256_file

SAMPLE_PROMPTS = [
    [{"role": "user", "content": "My card payment was declined at the shop. What should I do?"}],
    [{"role": "user", "content": "How long does a bank transfer take to arrive?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 times 7?"}],
]


def resolve_base(adapter: Path, base: str | None) -> str:
    """The base to merge into: --base, else the sidecar's base_model, else adapter_config's base path."""
    if base:
        return base
    side = adapter / "gemtune.json"
    if side.is_file():
        try:
            b = json.loads(side.read_text()).get("base_model")
        except ValueError:
            b = None
        if isinstance(b, dict):
            b = b.get("path") or b.get("name")
        if b:
            return str(b)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    b = cfg.get("base_model_name_or_path")
    if not b:
        raise UserError("adapter names no base model; pass --base", file=str(adapter / "adapter_config.json"),
                        field="base_model_name_or_path")
    return str(b)


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


def _greedy(model, ids_list, stop_ids, pad_id, max_new_tokens: int) -> list[list[int]]:
    import torch

    outs = []
    with torch.inference_mode():
        for ids in ids_list:
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
            outs.append(y[0, len(ids):].tolist())
    return outs


def _prompt_logits(model, ids_list):
    import torch

    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in ids_list]


WRITER = "gemtune merge"


def is_merge_output(d: Path) -> bool:
    """A merged-model directory written before gemtune marked its outputs (it holds gemtune-merge.json)."""
    return (d / "gemtune-merge.json").is_file()


def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | None = None,
                  prompts: str | Path | None = None, max_new_tokens: int = 32, progress=None,
                  overwrite: bool = False) -> dict:
    """Merge `adapter` into its base, check greedy parity (fp32), save safetensors + tokenizer to `out`.

    Returns the parity report; raises GateFailed (exit 1) without writing `out` when outputs differ.
    `out` is replaced whole: it must be missing, empty or a gemtune output unless `overwrite`, and neither the
    adapter, the prompts nor a local base may lie inside it (checked before any model is loaded).
    """
    from peft import PeftModel

    from gemtune.base.families import family_of
    from gemtune.base.loader import load_base
    from gemtune.base.templates import render_prompt, stop_token_ids
    from gemtune.registry.store import inspect_adapter

    say = progress or (lambda msg: None)
    adapter = Path(adapter).expanduser()
    out = Path(out).expanduser()
    local_base = [Path(base).expanduser()] if base and Path(base).expanduser().exists() else []
    guard = {"writer": WRITER, "overwrite": overwrite, "recognise": is_merge_output,
             "inputs": [adapter, *([Path(prompts)] if prompts else []), *local_base]}
    check_out_dir(out, **{k: v for k, v in guard.items() if k != "writer"})
    cfg, _, problems, _ = inspect_adapter(adapter)
    base_ref = resolve_base(adapter, base)
    say(f"loading base {base_ref} (fp32)")
    model, tok = load_base(base_ref, dtype="float32")
    fam = family_of(model)
    conversations = load_prompts(prompts)
    ids_list = [render_prompt(m, tok, fam).input_ids for m in conversations]
    stops = stop_token_ids(tok, fam)
    say(f"loading adapter {adapter}")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as e:  # shapes that do not fit this base, unknown target modules
        raise UserError(f"cannot apply this adapter to {base_ref}: {type(e).__name__}: {e}",
                        file=str(adapter / "adapter_config.json")) from None
    peft_model.eval()
    say("generating with the unmerged adapter")
    before = _greedy(peft_model, ids_list, stops, tok.pad_token_id, max_new_tokens)
    logits_before = _prompt_logits(peft_model, ids_list)
    merged = peft_model.merge_and_unload()
    merged.eval()
    say("generating with the merged model")
    after = _greedy(merged, ids_list, stops, tok.pad_token_id, max_new_tokens)
    logits_after = _prompt_logits(merged, ids_list)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(logits_before, logits_after))
    rows = []
    for conv, a, b in zip(conversations, before, after):
        rows.append({"prompt": conv[-1]["content"][:80], "equal": a == b, "tokens": len(a),
                     "unmerged": tok.decode(a, skip_special_tokens=True),
                     "merged": tok.decode(b, skip_special_tokens=True)})
    report = {"adapter": str(adapter.resolve()), "base": base_ref,
              "adapter_sha256": sha256_file(adapter / "adapter_model.safetensors"), "dtype": "float32",
              "max_new_tokens": max_new_tokens, "parity": all(r["equal"] for r in rows),
              "max_abs_logit_diff": max_diff, "prompts": rows, "compat_notes": problems}
    if not report["parity"]:
        report["saved"] = False
        raise _ParityFailed(report)
    say(f"saving merged model to {out}")
    with atomic_dir(out, **guard) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "gemtune-merge.json").write_text(json.dumps({**report, "saved": True}, indent=2))
    report["saved"] = True
    report["out"] = str(out)
    return report


class _ParityFailed(GateFailed):
    def __init__(self, report: dict):
        bad = [r for r in report["prompts"] if not r["equal"]]
        super().__init__(f"merged model differs from the unmerged adapter on {len(bad)} of "
                         f"{len(report['prompts'])} prompts (max |Δlogit| {report['max_abs_logit_diff']:.3g}); "
                         "nothing was written")
        self.report = report
