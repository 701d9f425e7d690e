"""Progress of a training run: a rich bar on a terminal; plain lines (step, loss, examples/s, ETA) at a steady
interval when stdout goes to a log or a pipe, as HF Trainer's `logging_steps` do, flushed so a `tail -f` sees
them while the run goes on."""

from __future__ import annotations

import sys
import time
from typing import Optional

PLAIN_EVERY_S = 30.0  # log_every: null -> a line at most every 30 s (plus the first and the last step)


def make_progress(enabled: bool, total: int, start: int, *, log_every: Optional[int] = None, stream=None):
    """A progress reporter with `.update(step, loss=, examples_per_s=, tokens_per_s=, eval_loss=)` and `.close()`,
    or None when disabled."""
    if not enabled:
        return None
    stream = stream or sys.stdout
    if _isatty(stream):
        return RichProgress(total, start)
    return PlainProgress(total, start, log_every=log_every, stream=stream)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def eta(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainProgress:
    """`step 12/300 loss 1.2345 lr 1.9e-04 4.10 examples/s 2,310 tokens/s eta 0:03:12`, one line per interval."""

    def __init__(self, total: int, start: int, *, log_every: Optional[int] = None, stream=None,
                 every_s: float = PLAIN_EVERY_S, clock=time.monotonic):
        self.total, self.start, self.log_every, self.every_s = total, start, log_every, every_s
        self.stream, self.clock = stream or sys.stdout, clock
        self.t0 = clock()
        self.last: Optional[float] = None

    def due(self, step: int) -> bool:
        if step >= self.total or self.last is None:
            return True
        if self.log_every:
            return step % self.log_every == 0
        return self.clock() - self.last >= self.every_s

    def update(self, step: int, *, loss: float, examples_per_s: float, tokens_per_s: float,
               lr: Optional[float] = None, eval_loss: Optional[float] = None) -> None:
        if not self.due(step):
            return
        self.last = self.clock()
        done = step - self.start
        per_step = (self.last - self.t0) / done if done > 0 else 0.0
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f}"]
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if eval_loss is not None:
            parts.append(f"eval_loss {eval_loss:.4f}")
        parts += [f"{examples_per_s:.2f} examples/s", f"{tokens_per_s:,.0f} tokens/s",
                  f"eta {eta(per_step * (self.total - step))}"]
        print("train: " + "  ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """rich progress bar with loss, tokens/s and ETA."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                          TimeRemainingColumn(), transient=False)
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, *, loss: float, examples_per_s: float, tokens_per_s: float,
               lr: Optional[float] = None, eval_loss: Optional[float] = None) -> None:
        info = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s" + (f"  eval {eval_loss:.4f}" if eval_loss is not None
                                                               else "")
        self.p.update(self.task, completed=step, info=info)

    def close(self) -> None:
        self.p.stop()
