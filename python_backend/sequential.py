"""Anytime-valid evidence that a served policy's risk is above (or back below) its epsilon.

The question. Each served row has a loss D in {0, 1}: its answer disagrees with the full model's. The
policy was certified for E[D] <= epsilon on rows like its calibration rows. Live, D is observed only for
some rows: rows shadow-checked at full depth after their answer went out, each with a probability q
fixed before its outcome (by its exit, cohort and the state of the service); rows answered at the last
exit, whose D is 0, and rows run to full depth in conservative mode, whose early answer is known anyway,
are observed with q = 1. Z = D / q for an observed row and 0 for the others is then an unbiased view of
the row's loss: E[Z | past] = E[D | past], the risk the guarantee speaks of (the marginal over exits,
not a per-exit rate: calibration bounds the mixture, and one exit may well sit above epsilon while the
policy holds it).

Testing by betting. Against H0 "E[D | past] <= epsilon for every row" a gambler's wealth
prod_t (1 + lam_t (Z_t - epsilon)), with lam_t in [0, 1/epsilon] fixed before row t, is a nonnegative
supermartingale with initial value 1 (each factor is >= 0 because Z >= 0, and its mean is <= 1 under
H0); by Ville's inequality P(the wealth ever reaches 1/alpha) <= alpha, however often it is looked at.
lam_t = rho * scale_t / epsilon: scale_t (in (0, 1], fixed before the rows: the stream's current checking
rate) keeps a checked disagreement's gain about the same whatever the rate, and rho is one point of a
grid; the average of the grid's wealths is itself such a supermartingale (a mixture bet, which pays a
factor of the grid's size for not knowing the best rho). The bet must not depend on the row's own exit:
that would test each exit's rate against epsilon, which the certification does not promise.
Against H0' "E[D | past] >= epsilon" (evidence that the risk is back below) the factor is
1 + rho (epsilon - Z) / (z_max - epsilon), with z_max >= Z fixed before the rows (1 / the smallest
checking probability), which keeps it >= 1 - rho > 0.

Restarts. A wealth started at the first row and ground down by a million healthy rows needs long to
climb back after a sudden shift. So a fresh wealth starts at a sequence of stopping times (every
``restart_rows`` rows of the stream, and at each event a caller reports: the drift monitor saw the exit
profile move), and the evidence is the weighted sum M = sum_s w_s W_s with fixed weights summing to at
most 1 (the i-th start of each kind: share / (i (i + 1))). M plus the weights of the starts not yet made
is a nonnegative supermartingale starting at <= 1, so P(M ever reaches 1/alpha) <= alpha still, for all
time. The price of a start made late is its weight: it needs log(1 / (alpha w)) nats of evidence
instead of log(1 / alpha).

Computation. Every start shares the cumulative log-wealth S_j of grid point j from the process's first
row: W_{s,j} = exp(S_j(now) - S_j(t_s)), so M = (1/J) sum_j exp(S_j) * sum_s w_s exp(-S_j(t_s)): two
vectors of J numbers, whatever the number of starts. It also makes evidence additive: several
processes watching parts of one stream (the orchestrator's instances) add their log-growths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

ABOVE = "above"  # evidence that the risk is above epsilon
BELOW = "below"  # evidence that it is below
# The bets against "below epsilon": rho = 1/2, 1/4, ... down to under epsilon / 2 (the best rho for a
# risk R above epsilon is about (R - epsilon) / (1 - epsilon): epsilon at 2 epsilon, near 1 far above).
# Against "above": the best is about (epsilon - R) / epsilon, from 1 (no disagreement) down.
BELOW_RHOS = (0.875, 0.75, 0.5, 0.25, 0.125, 0.0625)


def above_rhos(epsilon: float) -> tuple[float, ...]:
    """1/2, 1/4, ... down to the first power of two under epsilon / 2 (three points at least)."""
    points = max(3, math.ceil(math.log2(2.0 / epsilon)))
    return tuple(2.0**-k for k in range(1, points + 1))


@dataclass(frozen=True)
class Observations:
    """Rows of one stream observed together: the values Z that are not 0, how many rows had Z = 0, and
    two numbers fixed before the rows were seen: the bet scale (the checking rate the bets assume, in
    (0, 1]) and ``z_max``, at least every Z the rows could take (1 / their smallest checking probability)."""

    nonzero: np.ndarray  # (n,) Z > 0
    zeros: int
    bet_scale: float = 1.0
    z_max: float = 1.0

    @property
    def rows(self) -> int:
        return len(self.nonzero) + self.zeros


@dataclass(frozen=True)
class Bets:
    """A grid of bets in one direction against one epsilon."""

    direction: str
    epsilon: float
    rhos: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.direction not in (ABOVE, BELOW):
            raise ValueError(f"direction must be {ABOVE!r} or {BELOW!r}, not {self.direction!r}")
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must lie in (0, 1), not {self.epsilon}")
        if not self.rhos or not all(0.0 < r < 1.0 for r in self.rhos):
            raise ValueError(f"bets must lie in (0, 1), not {self.rhos}")

    @classmethod
    def against(cls, direction: str, epsilon: float) -> Bets:
        return cls(direction, epsilon, above_rhos(epsilon) if direction == ABOVE else BELOW_RHOS)

    def log_growth(self, observed: Observations) -> np.ndarray:
        """(J,) the log of each bet's wealth factor over the rows."""
        rho = np.asarray(self.rhos)
        values = np.asarray(observed.nonzero, dtype=np.float64)
        if self.direction == ABOVE:
            if not 0.0 < observed.bet_scale <= 1.0:
                raise ValueError(f"bet scale must lie in (0, 1], not {observed.bet_scale}")
            step = rho * observed.bet_scale / self.epsilon  # lam, (J,)
            growth = observed.zeros * np.log1p(-step * self.epsilon)
            return growth + np.log1p(np.outer(step, values - self.epsilon)).sum(axis=1)
        if observed.z_max <= self.epsilon or (len(values) and values.max() > observed.z_max * (1 + 1e-9)):
            raise ValueError(f"z_max {observed.z_max} must exceed epsilon and every value")
        step = rho / (observed.z_max - self.epsilon)
        growth = observed.zeros * np.log1p(step * self.epsilon)
        return growth + np.log1p(np.outer(step, self.epsilon - values)).sum(axis=1)


class EProcess:
    """The weighted sum over starts of a grid of betting wealths (the module's docstring): its log value
    reaches log(1/alpha) with probability at most alpha under the null, at any time."""

    KINDS = ("event", "periodic")

    def __init__(self, bets: Bets, restart_rows: int, event_share: float = 0.5) -> None:
        if restart_rows < 1 or not 0.0 < event_share < 1.0:
            raise ValueError("restart_rows must be >= 1 and event_share in (0, 1)")
        self.bets = bets
        self.restart_rows = restart_rows
        self.shares = {"event": event_share, "periodic": 1.0 - event_share}
        self.log_wealth = np.zeros(len(bets.rhos))  # S_j: cumulative, from this process's first row
        self.log_starts = np.full(len(bets.rhos), -np.inf)  # log sum_s w_s exp(-S_j(t_s))
        self.rows = 0
        self.starts = {kind: 0 for kind in self.KINDS}
        # The first start (now) is the first periodic one, so a reported event gets the first, largest
        # event weight: a sudden shift is where the evidence is needed soonest.
        self.start("periodic")

    def start(self, kind: str) -> None:
        """A fresh wealth from now on, with the next weight of its kind."""
        index = self.starts[kind] = self.starts[kind] + 1
        log_weight = math.log(self.shares[kind] / (index * (index + 1)))
        self.log_starts = np.logaddexp(self.log_starts, log_weight - self.log_wealth)

    def observe(self, observed: Observations) -> None:
        self.advance(self.bets.log_growth(observed), observed.rows)

    def advance(self, log_growth: np.ndarray, rows: int) -> None:
        """Adds rows' log-growth (its own, or another process's on the same stream); a periodic start is
        made at the first update at or past each multiple of ``restart_rows``."""
        before = self.rows // self.restart_rows
        self.log_wealth = self.log_wealth + log_growth
        self.rows += rows
        for _ in range(self.rows // self.restart_rows - before):
            self.start("periodic")

    @property
    def log_value(self) -> float:
        """log M, the evidence against the null so far (log(1/alpha) is the level-alpha test)."""
        return float(logsumexp(self.log_wealth + self.log_starts) - math.log(len(self.log_wealth)))


@dataclass(frozen=True)
class AlarmConfig:
    epsilon: float
    alpha: float = 0.05  # P(an alarm while the risk is within epsilon) <= alpha, per episode
    clear_alpha: float = 0.05  # P(a clear while the risk is still above epsilon) <= clear_alpha
    restart_rows: int = 500
    event_share: float = 0.5  # the share of the weights kept for starts at reported events

    def __post_init__(self) -> None:
        if not (0.0 < self.alpha < 1.0 and 0.0 < self.clear_alpha < 1.0):
            raise ValueError("alpha and clear_alpha must lie in (0, 1)")


@dataclass
class RiskAlarm:
    """Raised when the evidence says the risk is above epsilon, cleared when it says it is below.

    Each episode has its own e-process: from a start (or a clear) the test against "within epsilon";
    from an alarm the test against "above epsilon", which sees only rows after the alarm. Both
    directions' log-growth is handed in for every update, so a caller can keep one running sum of each
    for several alarms (processes) to share.
    """

    config: AlarmConfig
    raised: bool = False
    alarms: int = 0
    decided_after: int = 0  # rows the test that last changed the state had seen
    process: EProcess = field(init=False)

    def __post_init__(self) -> None:
        self.bets = {d: Bets.against(d, self.config.epsilon) for d in (ABOVE, BELOW)}
        self.process = self._process(ABOVE)

    def _process(self, direction: str) -> EProcess:
        return EProcess(self.bets[direction], self.config.restart_rows, self.config.event_share)

    @property
    def level(self) -> float:
        """log(1/alpha) of the active test."""
        return -math.log(self.config.clear_alpha if self.raised else self.config.alpha)

    @property
    def evidence(self) -> float:
        """log e-value of the active test (against 'within epsilon' unless raised)."""
        return self.process.log_value

    @property
    def suspicious(self) -> bool:
        """Not raised, but half the evidence an alarm needs (on the log scale) is there; under the null
        this happens at all with probability at most sqrt(alpha)."""
        return not self.raised and self.evidence >= self.level / 2

    def growth(self, observed: Observations) -> dict[str, np.ndarray]:
        """Both directions' log-growth over the rows: what ``advance`` takes, and what peers share."""
        return {d: bets.log_growth(observed) for d, bets in self.bets.items()}

    def advance(self, growth: dict[str, np.ndarray], rows: int, decide: bool = True) -> str | None:
        """Adds rows' log-growth; returns "raised" or "cleared" when the state changed. With ``decide``
        false the evidence only accumulates: another alarm decides for this one (``adopt``)."""
        self.process.advance(growth[BELOW if self.raised else ABOVE], rows)
        if not decide or self.evidence < self.level:
            return None
        return self.adopt(not self.raised)

    def adopt(self, raised: bool) -> str | None:
        """Takes the state ``raised`` (decided here, or by the alarm this one follows): a change starts
        the next episode's test; returns "raised" or "cleared" when the state changed."""
        if raised == self.raised:
            return None
        self.decided_after = self.process.rows
        self.raised = raised
        self.alarms += raised
        self.process = self._process(BELOW if raised else ABOVE)
        return "raised" if raised else "cleared"

    def event(self) -> None:
        """Something outside the test says the stream may have changed now: start a fresh wealth."""
        self.process.start("event")
