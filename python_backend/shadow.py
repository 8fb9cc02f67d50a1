"""Shadow checks: a sample of early answers run again at full depth after they were sent, and what that
says about the policy's live risk.

The policy's guarantee (risk <= epsilon with probability >= 1 - delta) holds for rows like its
calibration rows. On inputs unlike them an early exit can be confidently wrong, and the exit profile is
a weak witness of it. This measures the promise itself, on live traffic:

- Sampling (``ShadowChecks.observe``, in the request's thread, after its answer is ready): of the rows
  the policy decided freely (no forced depth, rung 0), each one that left early is checked with a
  probability q fixed before its outcome: the base ``rate``, or its exit's or its cohort's rate, more
  for a cohort's first rows (``new_cohort_rate``), and ``boost_rate`` while something says the risk may
  have moved: for ``boost_rows`` rows after the drift monitor's profile leaves its stable band (a burst:
  a benign shift of the mix may keep the profile out for good, and checks on every early row for good
  would cost more than the full model), and for as long as the risk test has half the evidence an
  alarm needs or an alarm is up without conservative mode. Rows answered at the last exit disagree
  with nothing (D = 0), and rows run to full depth by conservative mode carry both answers: both are
  observed for free. The checked rows' inputs are copied to a bounded queue; nothing else waits.
- Checking (a worker thread of the orchestrator's process): the queued rows run through the full model
  in batches (a BLS call from this thread works in tritonserver 2.51 alongside the requests' own, after
  their responses went out; measured in ``docs/embedded-server.md``), and each check's agreement goes to
  the metrics (by exit and cohort) and an audit line.
- Testing (``offramp.backend.sequential``): per cohort, an anytime-valid test of "risk <= epsilon" on
  Z = D / q, raised at evidence 1/alpha; while any cohort's alarm is raised the service runs every row
  to full depth (with ``conservative``; through the segments, so each row's early answer is still
  known and every row is evidence), and a test of "risk >= epsilon" on the cohort's rows after the
  alarm clears it at 1/clear_alpha. The instances of a model add their evidence through
  ``offramp.backend.shared_state``, and one of them decides: the live instance with the lowest process
  id raises and clears, the others take its state (``absorb``). Were each instance to decide on its own,
  their tests would start their episodes at different rows of the shared stream: one instance cleared
  while another, with no traffic of its own after that, kept its alarm (and conservative mode) for good,
  and with k deciders a false alarm would have up to k chances.
- Keeping (``store_path``, off unless the operator sets it): a uniform sample of the free rows (every
  row with the same probability ``store_rate``, whatever its exit) with inputs and both answers, for
  ``offramp calibrate --shadow`` to certify a new policy on live traffic; a retention limit in rows and
  age (``offramp.backend.shadow_store``).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np

from offramp.backend.sequential import ABOVE, BELOW, AlarmConfig, Observations, RiskAlarm
from offramp.backend.shadow_store import ShadowStore

# run_full(inputs) -> logits (n, C) of the network without exits
RunFull = Callable[[Mapping[str, np.ndarray]], Any]
HAND_OVER_ROWS = 4096
HAND_OVER_S = 1.0
DRAWS = 65536  # uniforms drawn at a time for the requests' sampling (ShadowChecks.__init__ says why)
OTHER_COHORTS = "*"  # past MAX_COHORTS distinct names, the rest share one test
MAX_COHORTS = 64


def _rates(text: str, key: Callable[[str], Any]) -> dict[Any, float]:
    """'a=0.1,b=0.2' -> {key(a): 0.1, key(b): 0.2}."""
    rates = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        # A rate of 0 would leave that exit's or cohort's disagreements unseen: the estimate of the risk
        # would be biased low, and the test that clears an alarm would no longer be valid.
        if not _ or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"shadow rate {item!r}: write name=probability, the probability in (0, 1]")
        rates[key(name.strip())] = float(value)
    return rates


@dataclass(frozen=True)
class ShadowConfig:
    """The shadow checks of one orchestrator (Triton config parameters ``offramp_shadow_<field>``)."""

    rate: float = 0.0  # probability that a row that left early is checked; 0: no checks at all
    exit_rates: str = ""  # "0=0.02,1=0.01": by exit (0-based), instead of rate (which must be > 0)
    cohort_rates: str = ""  # "vip=0.05": by cohort, instead of the exit's rate
    new_cohort_rate: float = 0.1  # a cohort's first new_cohort_rows rows in this process
    new_cohort_rows: int = 1000
    # While something says the risk may have moved: every early row, since the evidence a checked row
    # brings is at most the KL divergence of the risk from epsilon (0.07 nats at 3 epsilon), and a row
    # left unchecked brings none.
    boost_rate: float = 1.0
    boost_rows: int = 2000  # rows of this instance the burst lasts after the profile leaves its band
    epsilon: float = 0.0  # the risk level tested; 0: the policy's own (its provenance)
    alpha: float = 0.05  # P(an alarm while the risk is within epsilon) <= alpha
    clear_alpha: float = 0.05  # P(a clear while it is still above) <= clear_alpha
    restart_rows: int = 500  # a fresh wealth every this many rows of a cohort's stream
    conservative: bool = True  # while an alarm is raised, every row runs to full depth
    batch_rows: int = 64  # checks per full-model call
    max_pending_rows: int = 4096  # checks waiting beyond this are dropped (counted; they count as agreeing)
    store_path: str = ""  # keep a uniform sample of rows with their inputs here; empty: keep none
    store_rate: float = 0.0  # its probability; 0: rate
    store_max_rows: int = 100_000  # per process
    store_max_age_h: float = 168.0
    seed: int = -1  # the sampler's; -1: from the process id and the time

    PREFIX = "offramp_shadow_"

    def __post_init__(self) -> None:
        for name in ("rate", "new_cohort_rate", "boost_rate", "store_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"shadow {name} must lie in [0, 1], not {getattr(self, name)}")
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"shadow epsilon must lie in [0, 1), not {self.epsilon}")
        if self.boost_rows < 0:
            raise ValueError(f"shadow boost_rows must be >= 0, not {self.boost_rows}")
        if (
            self.exit_rate_map or self.cohort_rate_map
        ) and self.rate == 0:  # parsed now: a malformed string fails the load
            raise ValueError(
                "shadow exit_rates and cohort_rates need a rate > 0 for the exits and cohorts not listed"
            )

    @property
    def enabled(self) -> bool:
        """Checks run where ``rate`` > 0: it is the rate of every exit and cohort not listed."""
        return self.rate > 0

    @property
    def exit_rate_map(self) -> dict[int, float]:
        return _rates(self.exit_rates, int)

    @property
    def cohort_rate_map(self) -> dict[str, float]:
        return _rates(self.cohort_rates, str)

    def to_parameters(self) -> dict[str, str]:
        return {
            self.PREFIX + k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> ShadowConfig:
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = parameters.get(cls.PREFIX + spec.name)
            if raw is not None:
                kind = type(getattr(cls(), spec.name))
                values[spec.name] = raw.lower() == "true" if kind is bool else kind(raw)
        return cls(**values)


@dataclass
class _Checks:
    """The rows of one record that wait for their full-depth answer."""

    inputs: dict[str, np.ndarray]  # (n, ...) each
    exits: np.ndarray
    labels: np.ndarray  # the early answers sent
    probabilities: np.ndarray  # q of each
    request_ids: list[str | None]
    rows: np.ndarray
    kept: np.ndarray  # (n,) bool: also goes to the store
    full_labels: np.ndarray | None = None  # filled by the worker; None: the check was lost


@dataclass
class _Record:
    """One cohort's free rows of one execute: what is known now and what a check will tell."""

    cohort: str
    time: float
    bet_scale: float
    z_max: float
    known: list[float]  # Z > 0 known now (conservative rows that disagreed: 1)
    zeros: int  # rows with Z = 0 known now
    checks: _Checks | None
    kept: dict[str, Any] | None  # rows for the store whose full answer is known now


@dataclass
class _CohortState:
    alarm: RiskAlarm | None
    rows: int = 0  # rows of this cohort this process saw
    growth: dict[str, np.ndarray] = field(default_factory=dict)  # this process's cumulative log-growth
    grown_rows: int = 0
    peers: dict[int, tuple[dict[str, np.ndarray], int]] = field(default_factory=dict)  # pid -> last seen
    loss_sum: float = 0.0  # sum of Z since the last alarm transition: the running estimate's numerator
    loss_rows: int = 0


class ShadowChecks:
    """Samples, checks and tests, for one orchestrator process (the module's docstring)."""

    def __init__(
        self,
        config: ShadowConfig,
        num_exits: int,
        epsilon: float | None,
        *,
        model: str = "",
        policy_version: str = "",
        telemetry: Any = None,
        audit: Any = None,
        store: ShadowStore | None = None,
        clock: Callable[[], float] = time.time,
        pid: int | None = None,
    ) -> None:
        self.config = config
        self.pid = os.getpid() if pid is None else pid  # this instance's id among the model's instances
        self.leader: int | None = None  # the instance whose alarm decisions this one takes (None: itself)
        self.num_exits = num_exits
        self.epsilon = config.epsilon or epsilon
        self.model, self.policy_version = model, policy_version
        self.telemetry, self.audit, self.store = telemetry, audit, store
        self.clock = clock
        seed = config.seed if config.seed >= 0 else (os.getpid() * 1_000_003 + time.time_ns()) % 2**32
        self._rng = np.random.default_rng(seed)
        # The request thread's uniforms come from a buffer drawn DRAWS at a time: NumPy's generator lets
        # go of the GIL for each draw, and taking it back waits for a busy worker thread (up to the
        # interpreter's 5 ms switch interval): 60 us per 16-row draw measured with a busy worker.
        self._draw_buffer = np.empty(0)
        self._exit_rates = config.exit_rate_map
        self._cohort_rates = config.cohort_rate_map
        self._store_rate = (config.store_rate or config.rate) if store is not None else 0.0
        self._cohorts: dict[str, _CohortState] = {}
        # The cohorts and their tests: requests add cohorts, the worker and the exchange thread move tests.
        self._lock = threading.RLock()
        self._moving = False  # the drift monitor's profile is out of its stable band
        self._burst_rows = 0  # rows the burst of checks after the profile moved still covers
        self.conservative = False  # an alarm is raised and every row runs to full depth
        self._boosted: frozenset[str] = frozenset()
        # (records, then a fresh wealth in every test: the profile moved after them), None: stop.
        self._queue: queue.Queue[tuple[list[_Record], bool] | None] = queue.Queue()
        # What was observed waits here and goes to the worker together, every HAND_OVER_S or
        # HAND_OVER_ROWS rows, checks too: each settlement holds the GIL the requests' thread needs, and
        # its checks are a BLS call to the full model (about 3 ms of CPU per call on the CNN, beside a
        # few rows' compute). One settlement per record cost the CNN's orchestrator 0.4 ms of CPU per
        # request, about a tenth of its throughput at concurrency 8; a hand-over at each check, about
        # 17 a second there at 1%, still 3-5%. While something says the risk may have moved (the burst
        # after the profile moved, half an alarm's evidence) a check goes over at once, so the alarm is not
        # late by a second of traffic when it matters; in conservative mode every record does (no BLS
        # call: both answers are known), so the clear is not late either, while every row runs to full
        # depth. Rows with nothing to check, keep or count are only counted: (cohort, bet scale, z_max)
        # -> rows with Z = 0.
        self._held: list[_Record] = []
        self._held_zeros: dict[tuple[str, float, float], int] = {}
        self._held_rows = 0
        self._handed_at = clock()
        self._pending = 0  # checks queued, not yet run
        self._run_full: RunFull | None = None
        self.dropped = 0  # checks not run: the queue was full
        self.failed = 0  # checks whose full-model call failed
        self.errors = 0  # settlements that failed (a bug): their rows are lost to the test
        self.last_error: str | None = None
        self._worker = threading.Thread(target=self._work, name="offramp-shadow", daemon=True)
        self._worker.start()

    # --- the request's thread ---------------------------------------------------------------

    def _key(self, cohort: str) -> str:
        if cohort in self._cohorts or len(self._cohorts) < MAX_COHORTS:
            return cohort
        return OTHER_COHORTS

    def _state(self, key: str) -> _CohortState:
        if key not in self._cohorts:
            alarm = None
            if self.epsilon:
                config = self.config
                alarm = RiskAlarm(
                    AlarmConfig(self.epsilon, config.alpha, config.clear_alpha, config.restart_rows)
                )
            self._cohorts[key] = _CohortState(alarm)
        return self._cohorts[key]

    def rate(self, exit_index: int, cohort: str) -> float:
        """The probability that a row of ``cohort`` leaving at ``exit_index`` is checked, now."""
        config = self.config
        rate = self._cohort_rates.get(cohort, self._exit_rates.get(exit_index, config.rate))
        state = self._cohorts.get(self._key(cohort))
        if state is None or state.rows < config.new_cohort_rows:
            rate = max(rate, config.new_cohort_rate)
        if self._burst_rows > 0 or self._key(cohort) in self._boosted:
            rate = max(rate, config.boost_rate)
        return min(1.0, max(rate, self._store_rate))

    @property
    def alert(self) -> bool:
        """Whether an alarm may be near or is up: checks boosted (the burst after a move, a cohort's
        evidence) or conservative mode (every row is evidence that may clear it)."""
        return self._burst_rows > 0 or bool(self._boosted) or self.conservative

    def profile_moved(self, moving: bool) -> None:
        """The drift monitor's profile left its stable band (or came back): leaving it starts a burst of
        boosted checks, and each change starts a fresh wealth in every cohort's test (an event start)."""
        if moving == self._moving:
            return
        self._moving = moving
        self._burst_rows = self.config.boost_rows if moving else 0
        # The fresh wealth bets on the rows after the change only (its start is a stopping time): the
        # rows held until now (up to a second of traffic) go to the tests first. Settled after the start,
        # a switch's last in-domain rows were charged to the bets on the foreign rows after it.
        self._hand_over(self.clock(), event=True)

    def observe(
        self,
        *,
        labels: np.ndarray,
        policy_exit: np.ndarray,
        policy_label: np.ndarray,
        free: np.ndarray,
        conservative: bool,
        cohorts: np.ndarray,
        inputs: Mapping[str, np.ndarray],
        request_ids: list[str | None],
        rows: np.ndarray,
        run_full: RunFull | None,
    ) -> None:
        """Samples the answered batch's free rows (all (B,): the answer sent, the exit the policy chose and
        its label there, whether the policy chose freely, the cohort ("" for none), the request id and
        the row within its request; ``conservative``: conservative mode ran every row to full depth) and
        queues what needs a check. Never waits on a check."""
        self._run_full = run_full
        last = self.num_exits - 1
        now = self.clock()
        draws = self._draws(len(labels))
        free_cohorts = cohorts[free]
        single = all(c == free_cohorts[0] for c in free_cohorts)  # the common case: one cohort
        for cohort in free_cohorts[:1] if single else sorted(set(free_cohorts.tolist())):
            mine = free if single else free & (cohorts == cohort)
            mine_rows = int(np.count_nonzero(mine))
            key = self._key(cohort)
            with self._lock:
                state = self._state(key)
            # Conservative rows' early answer (policy_label) and full one are both known: no check.
            early = np.zeros_like(mine) if conservative else mine & (policy_exit < last)
            # One look at the rates per record: z_max must bound every Z = 1 / q of its checks.
            rates = np.array([self.rate(k, cohort) for k in range(last)] or [1.0])
            q = np.where(early, rates[np.minimum(policy_exit, len(rates) - 1)], 0.0)
            checked = early & (draws < q)
            index = np.flatnonzero(checked)
            if len(index):
                with self._lock:
                    if self._pending + len(index) > self.config.max_pending_rows:
                        self.dropped += len(index)
                        checked[:], index = False, index[:0]
                    self._pending += len(index)
            known_disagree = int(np.count_nonzero(mine & (policy_label != labels))) if conservative else 0
            lowest = max(float(rates.min()), 1e-6)
            bet_scale, z_max = (1.0, 1.0) if conservative else (lowest, 1.0 / lowest)
            kept = mine & (draws < self._store_rate) if self._store_rate else None
            known_kept = np.flatnonzero(kept & ~checked & ~early) if kept is not None else index[:0]
            state.rows += mine_rows
            zeros = mine_rows - known_disagree - len(index)
            if not (len(index) or known_disagree or len(known_kept)):
                batch = (key, bet_scale, z_max)
                self._held_zeros[batch] = self._held_zeros.get(batch, 0) + zeros
                continue
            checks = None
            if len(index):
                checks = _Checks(
                    inputs={name: np.array(array[index]) for name, array in inputs.items()},
                    exits=policy_exit[index],
                    labels=labels[index],
                    probabilities=q[index],
                    request_ids=[request_ids[i] for i in index],
                    rows=rows[index],
                    kept=kept[index] if kept is not None else np.zeros(len(index), dtype=bool),
                )
            self._held.append(
                _Record(
                    cohort=key,
                    time=now,
                    bet_scale=bet_scale,
                    z_max=z_max,
                    known=[1.0] * known_disagree,
                    zeros=zeros,
                    checks=checks,
                    kept=self._kept(
                        known_kept, inputs, policy_exit, policy_label, labels, cohort, request_ids, rows, now
                    )
                    if len(known_kept)
                    else None,
                )
            )
        self._held_rows += len(free_cohorts)
        self._burst_rows = max(0, self._burst_rows - len(free_cohorts))
        hurry = self.conservative or (self.alert and any(r.checks is not None for r in self._held))
        if hurry or self._held_rows >= HAND_OVER_ROWS or now - self._handed_at >= HAND_OVER_S:
            self._hand_over(now)

    def _draws(self, count: int) -> np.ndarray:
        """``count`` uniforms on [0, 1) from the buffer (refilled when it runs short)."""
        if len(self._draw_buffer) < count:
            self._draw_buffer = self._rng.random(max(DRAWS, count))
        taken, self._draw_buffer = self._draw_buffer[:count], self._draw_buffer[count:]
        return taken

    def _hand_over(self, now: float, event: bool = False) -> None:
        held = self._held + [
            _Record(cohort, now, bet_scale, z_max, known=[], zeros=zeros, checks=None, kept=None)
            for (cohort, bet_scale, z_max), zeros in self._held_zeros.items()
        ]
        if held or event:
            self._queue.put((held, event))
        self._held, self._held_zeros, self._held_rows, self._handed_at = [], {}, 0, now

    def _kept(self, index, inputs, exits, early_labels, full_labels, cohort, request_ids, rows, now) -> dict:
        return {
            "inputs": {name: np.array(array[index]) for name, array in inputs.items()},
            "exit": exits[index],
            "label": early_labels[index],
            "full_label": full_labels[index],
            "cohort": [cohort] * len(index),
            "request_id": [request_ids[i] or "" for i in index],
            "row": rows[index],
            "time": np.full(len(index), now),
        }

    # --- the worker thread ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            items = [self._queue.get()]
            while items[-1] is not None and not self._queue.empty():  # what gathered meanwhile, in few calls
                items.append(self._queue.get_nowait())
            try:
                records: list[_Record] = []
                for held, event in filter(None, items):
                    records.extend(held)
                    if event:  # the rows before the profile's change first, then the fresh wealth
                        self._settle(records)
                        records = []
                        self._start_events()
                self._settle(records)
            except Exception as error:  # noqa: BLE001 -- a failed settlement must not end the worker
                self.errors += 1
                self.last_error = repr(error)
            finally:
                for _ in items:
                    self._queue.task_done()
            if items[-1] is None:
                return

    def _start_events(self) -> None:
        with self._lock:
            for state in self._cohorts.values():
                if state.alarm is not None:
                    state.alarm.event()

    def drain(self) -> None:
        """Waits until every row observed so far is settled (its check run and counted)."""
        self._hand_over(self.clock())
        self._queue.join()

    def _settle(self, records: list[_Record]) -> None:
        if not records:
            return
        checks = [r.checks for r in records if r.checks is not None]
        self._run_checks(checks)
        with self._lock:
            self._pending -= sum(len(c.exits) for c in checks)
        counts: dict[tuple[int, str], list[int]] = {}
        audit: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        # The rows of one cohort under the same bet go to its test as one batch: its value is the same
        # (the wealth is a product), the test only looks at it less often.
        batches: dict[tuple[str, float, float], tuple[list[float], int]] = {}
        with self._lock:
            for record in records:
                nonzero, zeros = list(record.known), record.zeros
                check = record.checks
                if check is not None:
                    if check.full_labels is None:  # lost: counted as agreeing, which only weakens the test
                        zeros += len(check.exits)
                    else:
                        disagree = check.labels != check.full_labels
                        nonzero += (1.0 / check.probabilities[disagree]).tolist()
                        zeros += int((~disagree).sum())
                        for exit_index, wrong in zip(check.exits.tolist(), disagree.tolist(), strict=True):
                            tally = counts.setdefault((exit_index, record.cohort), [0, 0])
                            tally[0] += 1
                            tally[1] += wrong
                        audit.extend(self._check_records(record, check, disagree))
                key = (record.cohort, record.bet_scale, record.z_max)
                known, none = batches.get(key, ([], 0))
                batches[key] = (known + nonzero, none + zeros)
            for (cohort, bet_scale, z_max), (nonzero, zeros) in batches.items():
                event = self._advance(cohort, Observations(np.array(nonzero), zeros, bet_scale, z_max))
                if event is not None:
                    events.append(event)
            self._boosted, self.conservative = self._flags()
        self._keep(records)
        if self.audit is not None and (audit or events):
            self.audit.record(audit + events, sampled=False)  # checks are rare already, alarms must all show
        if self.telemetry is not None:
            self.telemetry.shadow(counts, [e["cohort"] for e in events if e["event"] == "raised"])
            self.telemetry.publish()  # if due, as a request would

    def _run_checks(self, checks: list[_Checks]) -> None:
        """Full-depth labels for every check, in calls of at most ``batch_rows`` rows of one shape."""
        by_shape: dict[tuple, list[_Checks]] = {}
        for check in checks:
            shape = tuple((n, a.shape[1:]) for n, a in sorted(check.inputs.items()))
            by_shape.setdefault(shape, []).append(check)
        run_full = self._run_full
        for group in by_shape.values():
            inputs = {name: np.concatenate([c.inputs[name] for c in group]) for name in group[0].inputs}
            total = len(next(iter(inputs.values())))
            labels = np.empty(total, dtype=np.int64)
            try:
                if run_full is None:
                    raise RuntimeError("no full model to check against")
                for start in range(0, total, self.config.batch_rows):
                    part = {n: a[start : start + self.config.batch_rows] for n, a in inputs.items()}
                    labels[start : start + self.config.batch_rows] = np.asarray(run_full(part)).argmax(axis=1)
            except Exception:  # noqa: BLE001 -- the full model is away: checks lost, counted; serving goes on
                self.failed += total
                continue
            start = 0
            for check in group:
                check.full_labels = labels[start : start + len(check.exits)]
                start += len(check.exits)

    def _advance(self, cohort: str, observed: Observations) -> dict[str, Any] | None:
        """Adds rows to the cohort's test (and to what the other instances read)."""
        state = self._state(cohort)
        state.loss_sum += float(np.sum(observed.nonzero))
        state.loss_rows += observed.rows
        if state.alarm is None:
            return None
        growth = state.alarm.growth(observed)
        for direction, values in growth.items():
            state.growth[direction] = state.growth.get(direction, 0.0) + values
        state.grown_rows += observed.rows
        return self._move(cohort, state, growth, observed.rows)

    def _move(
        self, cohort: str, state: _CohortState, growth: dict[str, np.ndarray], rows: int
    ) -> dict[str, Any] | None:
        return self._event(cohort, state, state.alarm.advance(growth, rows, decide=self.leader is None))

    def _event(self, cohort: str, state: _CohortState, change: str | None) -> dict[str, Any] | None:
        """The audit line of an alarm's change (None for no change)."""
        if change is None:
            return None
        evidence = state.loss_sum / max(state.loss_rows, 1)
        state.loss_sum, state.loss_rows = 0.0, 0
        return {
            "kind": "risk_alarm",
            "event": change,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "model": self.model,
            "cohort": cohort,
            "epsilon": self.epsilon,
            "estimated_risk": round(evidence, 6),
            "rows_in_test": state.alarm.decided_after,  # since the last change (or the start)
            "decided_by": self.leader or self.pid,  # the instance whose test decided
            "policy_version": self.policy_version,
        }

    def _flags(self) -> tuple[frozenset[str], bool]:
        """The cohorts whose checks are boosted, and whether the service is to run conservatively."""
        alarms = {key: state.alarm for key, state in self._cohorts.items() if state.alarm is not None}
        conservative = self.config.conservative and any(alarm.raised for alarm in alarms.values())
        boosted = {
            key for key, alarm in alarms.items() if (alarm.raised and not conservative) or alarm.suspicious
        }
        return frozenset(boosted), conservative

    def gauges(self) -> dict[str, dict[str, float]]:
        """cohort -> the figures a dashboard shows of its test now."""
        gauges = {}
        with self._lock:
            for key, state in self._cohorts.items():
                figures = {"rate": self.rate(0, key), "estimate": state.loss_sum / max(state.loss_rows, 1)}
                if state.alarm is not None:
                    figures.update(
                        evidence=state.alarm.evidence,
                        level=state.alarm.level,
                        alarm=float(state.alarm.raised),
                    )
                gauges[key] = figures
        return gauges

    def _check_records(self, record: _Record, check: _Checks, disagree: np.ndarray) -> list[dict[str, Any]]:
        stamp = datetime.fromtimestamp(record.time, UTC).isoformat(timespec="milliseconds")
        return [
            {
                "kind": "shadow",
                "time": stamp,
                "model": self.model,
                "request_id": check.request_ids[i],
                "row": int(check.rows[i]),
                "exit": int(check.exits[i]),
                "label": int(check.labels[i]),
                "full_label": int(check.full_labels[i]),
                "agree": not bool(disagree[i]),
                "cohort": record.cohort or None,
                "check_probability": round(float(check.probabilities[i]), 6),
                "policy_version": self.policy_version,
            }
            for i in range(len(check.exits))
        ]

    def _keep(self, records: list[_Record]) -> None:
        if self.store is None:
            return
        for record in records:
            if record.kept is not None:
                self.store.add(**record.kept)
            check = record.checks
            if check is not None and check.full_labels is not None and check.kept.any():
                index = np.flatnonzero(check.kept)
                self.store.add(
                    inputs={name: array[index] for name, array in check.inputs.items()},
                    exit=check.exits[index],
                    label=check.labels[index],
                    full_label=check.full_labels[index],
                    cohort=[record.cohort] * len(index),
                    request_id=[check.request_ids[i] or "" for i in index],
                    row=check.rows[index],
                    time=np.full(len(index), record.time),
                )
        self.store.flush_if_due()

    # --- other instances ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Per cohort: this process's cumulative log-growth, for the other instances to add, and its
        alarm's state, for them to take when this instance decides."""
        with self._lock:
            return {
                key: {
                    "rows": state.grown_rows,
                    "raised": state.alarm.raised,
                    **{d: list(map(float, v)) for d, v in state.growth.items()},
                }
                for key, state in self._cohorts.items()
                if state.alarm is not None
            }

    def absorb(self, peers: Mapping[int, Mapping[str, Any]]) -> None:
        """Adds what the other live instances (pid -> ``snapshot()``) saw since the last look to each
        cohort's test; then, unless this instance has the lowest id and decides, takes the decider's
        alarm states."""
        events = []
        with self._lock:
            lowest = min(peers, default=self.pid)
            self.leader = lowest if lowest < self.pid else None
            for pid, cohorts in peers.items():
                for key, shared in cohorts.items():
                    state = self._state(self._key(key))
                    if state.alarm is None:
                        continue
                    seen, seen_rows = state.peers.get(pid, ({ABOVE: 0.0, BELOW: 0.0}, 0))
                    rows = int(shared["rows"]) - seen_rows
                    if rows <= 0:
                        continue
                    growth = {d: np.asarray(shared[d]) for d in (ABOVE, BELOW)}
                    state.peers[pid] = (growth, int(shared["rows"]))
                    event = self._move(self._key(key), state, {d: growth[d] - seen[d] for d in growth}, rows)
                    if event is not None:
                        events.append(event)
            for key, shared in peers.get(self.leader, {}).items():
                state = self._state(self._key(key))
                if state.alarm is not None:
                    event = self._event(self._key(key), state, state.alarm.adopt(bool(shared["raised"])))
                    if event is not None:
                        events.append(event)
            if events:
                self._boosted, self.conservative = self._flags()
        if events and self.audit is not None:
            self.audit.record(events, sampled=False)
        # An instance may change state on the others' evidence alone: count a raised alarm and publish
        # if due (the gauges are read from the state then, by the orchestrator's refresher).
        if events and self.telemetry is not None:
            self.telemetry.shadow({}, [e["cohort"] for e in events if e["event"] == "raised"])
            self.telemetry.publish()

    def close(self, timeout_s: float = 10.0) -> None:
        """Runs what is queued, writes the store, stops the worker."""
        self._hand_over(self.clock())
        self._queue.put(None)
        self._worker.join(timeout_s)
        if self.store is not None:
            self.store.flush()


def expected_epsilon(provenance: Mapping[str, Any]) -> float | None:
    """The epsilon a policy was certified at for the risk the checks measure, disagreement with the full
    model (None for an uncalibrated policy, or one certified on another risk: set the epsilon then)."""
    value = provenance.get("epsilon")
    if provenance.get("risk", "disagreement") != "disagreement":
        return None
    return float(value) if isinstance(value, int | float) and 0 < value < 1 and math.isfinite(value) else None
