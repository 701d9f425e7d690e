"""The regression gate: a candidate that breaks more than `threshold` of the cases its baseline got right cannot
ship, however good its average looks — an accuracy gain can hide regressions users will notice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gemtune.errors import GateFailed


@dataclass(frozen=True)
class GateResult:
    passed: bool
    threshold: float
    regressions: int
    n: int
    rate: float

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def reason(self) -> str:
        cmp = ">" if not self.passed else "<="
        return f"{self.regressions}/{self.n} cases regressed ({self.rate:.1%} {cmp} gate {self.threshold:.1%})"


def apply_gate(regressions: int, n: int, threshold: float = 0.02) -> GateResult:
    rate = regressions / n if n else 0.0
    return GateResult(passed=rate <= threshold, threshold=threshold, regressions=regressions, n=n, rate=round(rate, 6))


def enforce(gate: GateResult, line: str) -> None:
    """Raise `GateFailed` (CLI exit 1) when the gate said no."""
    if not gate.passed:
        raise GateFailed(f"{gate.reason}: {line}")
