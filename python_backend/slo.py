"""Holding a latency target through a spike: which rung of the policy's ladder to serve now.

The orchestrator serves rung 0 (the policy's own rules, the most conservative) by default. Each
window (``window_s``) it estimates its requests' p99 latency as the mean time a request waited in
Triton's queue for the orchestrator in that window (from Triton's ``nv_inference_queue_duration_us``
and ``nv_inference_request_success`` counters: under overload the queue is where latency grows, and
it grows for every request alike, so its mean tracks its tail) plus the p99 of the orchestrator's
own time per request in the window, or, where more, the wait a request arriving now faces: the
requests pending in Triton's queue for the model (``nv_inference_pending_request_count``) times the
orchestrator's time per request (an execute's time over its requests) over its ``instances``. The mean
wait of the requests a window answered lags a queue that is building: they came before it built.

Each orchestrator instance is a process with a controller of its own, which sees its own executes
alone; the model's instances serve one queue and are about equally busy. So a load, a capacity and an
arrival rate are the model's, all instances together: the requests it answered, from Triton's
``nv_inference_request_success`` counter between readings (where it cannot be read, this instance's
answers times ``instances``); times per request and how busy the instances are, this instance's.
Before, the load was this instance's share while capacities and the M/M/c queue were the model's, and
with two instances a saturated window (busy 80% of all instances' time, from one instance's executes)
could never be seen. Then, once per window:

- over the target itself with the instances saturated (see below): go to the top rung at once (a
  queue that built up drains fastest there; a rung a window costs seconds of backlog at the onset of a
  spike, measured on TREC); with idle instances it is a slow second at a light load, and it climbs as
  over ``climb_at`` (after a spike, a TREC run went from rung 0 back to the top at half load); at the
  top rung, where the operator enabled load shedding (``shed_max_exit``), cap every row not forced to
  full depth at that exit (flagged on each row), and if it was at the top already the SLO is being
  missed (only capacity helps now);
- over ``climb_at`` of the target: climb a rung (cheaper answers, a higher certified risk), or more
  where the rungs' expected compute says the next one cannot carry the load of now either; with idle
  instances (no queue: slow requests, not load) and under the target, only where the window before at
  this rung was over ``climb_at`` too. A window's own p99 at a light load is the slowest of a few
  requests: after a spike, single slow seconds at half load (one instance's own p99 132-150 ms against a
  130-140 ms climb point) sent TREC's ladders up a rung for 2-3 s, at the end of the schedule twice
  (measured). Over the target it climbs at once, idle or not: a step that comes mid-window leaves the
  instances busy for part of it only, and waiting a window at a Rotten Tomatoes 2x onset (an instance
  at 417 ms against 282) let the queue grow another second (measured);
- under ``descend_at`` of the target for ``descend_windows`` windows in a row: stop shedding, or
  descend, but not to a rung that was seen overloaded at the load of now: to the lowest rung that was
  seen to hold a load as high (a run of ``descend_windows`` windows served there whole, under
  ``descend_at`` of the target, at that mean load, which the rung carries with the headroom's margins
  at that mean, or a quarter more: ``held_load``; not within
  ``descend_load`` of a load it was seen over ``climb_at`` at), else a rung where predicted to
  fit (below). What a rung was seen to hold is the evidence that brings the ladder back to rung 0 after
  a spike: the prediction alone judged rung 0 from the top rung's figures, too far off to trust, and
  came down a rung at a time, when it came down at all (measured on TREC). Shedding stops only
  where the top rung without it is predicted to answer that load within ``climb_at`` of the target
  (the same prediction as a descent's, below, from the compute a shed row costs, ``shed_cost``):
  shedding is what makes the windows quiet, and stopping it on quiet windows alone turned it on and
  off through a 3x step, capping 12% of the rows, while the top rung alone queued over the target
  (measured on TREC). A window over
  ``climb_at`` at rung r whose instances spent at least ``SATURATED`` of their time in executes is an
  overload of r, and the requests it answered per second are what r carries (``capacity``); a descent
  to r waits until the load is under ``descend_load`` of that. Without it the controller left a rung
  that held a 2x load after three quiet windows, for one that could not, and the queue grew for
  seconds until it climbed back (measured on TREC). A window over ``climb_at`` with idle instances is a
  latency problem, not a throughput limit: it climbs but records nothing. Before that rule the
  controller recorded what a rung answered at a spike's onset (the load from before the step) or at a
  light load near a tight target, and then never went back to rung 0 at half the full model's
  capacity (measured on TREC).

A climb's rung and a descent's must also be predicted to answer the load of now under ``climb_at`` of
the target, or the controller would climb from it again a window later: the rung's time per request is
this window's, scaled by the rungs' work per request or measured capacities (below), its queue wait that
of an M/M/c queue (``queue_wait_ms``, ``mean_queue_wait_ms``) with the model's instances as servers, and
its own time this window's as it is; its p99 is taken as the larger of the own p99 plus the mean wait
and the own mean plus the p99 wait (the p99 of a sum of two independent parts is near the heavier tail's
p99 plus the other's mean; the sum of both p99s kept both TREC ladders at rung 1 after a spike, at half
the load that rung 0 answered within the target). A throughput margin is not a latency margin: at 80%
busy, Poisson arrivals wait several service times at p99. With that margin alone the controller came
down from the top rung to a rung that carried a 2x load by throughput, and its slowest seconds (430-550
ms against a 271 ms target) were those descents (measured on TREC). The own p99 is not scaled by the
compute: at a light load it is mostly a request's fixed cost, and scaled it kept the ladder off rung 0
after a spike (measured on TREC); a lower rung whose own time is over ``climb_at`` is climbed from a
window later. A descent is judged on the worst load, time per request and own p99 and mean of its run of
quiet windows, not on the last alone: one light window in a spike took the ladder down for a window
under a load that had not gone (measured on TREC).

What a rung carries, where it was never seen overloaded, is estimated from a rung that was, by their
work per request: requests per second times work per request is about constant for a saturated
server, and a request's work is its rung's expected compute per row (``costs``, the ladder's
calibration figures) plus ``fixed_cost``, what a request costs whatever its depth. Times per request
scale the same way. Scaled by the compute alone, a rung whose rows nearly all leave at an exit on the
embeddings (compute 0.0003 of the network's) looked 400 times cheaper than the top rung: shedding at
that exit never stopped after a spike, since the top rung alone was predicted never to fit, and
descents waited for loads far under what the rungs below carried (measured on TREC). Climbs still use
the estimate with the ``descend_load`` margin.

No one work figure fits every rung, though: on Rotten Tomatoes the full model, rung 0 and the top rung
carried 123, 232 and 847 rows/s, which wants a fixed cost of 0.03 from the top rung and 0.29 from rung 0
(a deeper rung makes more segment calls). Where the deployment measured what each rung carries
(``rung_capacity``), those figures are the capacities from the start, and a rung's time per request is
scaled by their ratio rather than by the work model; two windows in a row that overload a rung still
replace its figure, one does not: a step's first window answers at the rate of its burst, and in a TREC
run (40) instances that met the 1x step on rung 0 and jumped to the top from that one window learnt from
it a figure that the half load's doubling never fitted again, and stayed off rung 0 after the spike
(measured). With what a rung carries known, the controller also climbs before the latency shows a queue:
a window whose load passes ``climb_load`` of what its rung carries climbs as a window over ``climb_at``
would (a rung at 95% of its capacity builds its queue slowly, and the window's mean wait lags it: rung 0
of Rotten Tomatoes sat two seconds at the onset of a 2x step, p99 635 ms against 279). The gap between
``climb_load`` and ``descend_load`` keeps a steady load near a capacity from flapping between rungs.

Between windows, every quarter window, the controller looks at the pending requests alone: where the
wait they mean plus the last window's own p99 is over the target, it goes to the top rung at once, as a
window over the target would, instead of up to a second later (the onsets of a spike's steps were where
the ladder's tail came from, measured on TREC). Else it counts the requests that came to the model in
the last window's length (answered plus the growth of its queue, from the readings of Triton's metrics),
a window sliding by quarters, and climbs where they pass ``climb_load`` of what the rung carries: a step
that starts mid-window shows in that count up to three quarters of a window before the window's close.

Every test of what a rung carries asks for the load of now or ``headroom`` times the steady load (the
load of the last ``STEADY_RUNS`` x ``descend_windows`` windows), whichever is more (``_demand``). With
``headroom`` over 1 a climb or descent goes to a rung that carries that multiple, and the rung of now is
left where the multiple passes ``climb_load`` of what it carries. A reactive controller sees a step in
the load a second late (the load it counts is over the last window, the backlog check needs the queue
first), and a rung chosen for 1x, at 78-117% of what it carries at 2x, built its queue in that second
(the 2x onsets missed in TREC runs 25-26 and Rotten Tomatoes runs 7-8); with a headroom of 2 the rung of
1x carries 2x already, at the price of a higher rung (more risk, still certified) at a steady load.
Carrying it within the throughput margin is not enough, though: a rung that a step finds at 74-89% of
what it carries at saturation missed the target in the step's first second in 4 of 10 onsets, since the
queue builds before the climb (Rotten Tomatoes' rung 1 at 2x); ``headroom_load`` holds the risen load to
a smaller share of a rung than a load of now (``SloConfig``). That share is bounded from above by the
onsets and from below by the return to rung 0 after a spike (the half load's doubling fills rung 0 to
43-65%); only rung 0 is held by the return, so the rungs above may take a smaller one
(``headroom_load_above``). At a share of 0.7 for every rung the 2x onsets still missed found the rung
chosen for 1x at 52-60% of what it carries (TREC 51, 52, Rotten Tomatoes 27): the first second of a
doubling, not a steady load, and a rung holds its p99 within a target of twice the light-load p99
only at 20-90% of what it carries at saturation (perf_analyzer's search, ``offramp bench --spike``).
With 0.5 above rung 0, in scripted Poisson schedules at the capacities of eight served runs (30 each;
a script, not in the repository) the 2x onset found its rung at a median 30-44% of what it carries
against 52-60% (Rotten Tomatoes 25, whose ladder stays at rung 0 through 1x in half the schedules,
at 79% either way), the return to rung 0 took the same median windows, and a steady load at Rotten
Tomatoes' rung-0 boundary moved the rung as often (13-16 times in 300 windows). The price: the 1x step
is served by the top rung in most schedules (rung 2 before), a higher certified risk at a load that
the full model alone cannot answer. Served (TREC 53-55, Rotten Tomatoes 29-31): every 2x onset but
one (held) met on the top rung at 32-38% or on rung 2 at 50-54%; 2x and 3x each held by 11 of 12
ladders, both misses on the top rung in seconds when the instances' own time jumped; back at rung 0
12 of 12 (``benchmarks/spike/README.md``).

Every throughput test takes the steady load with its Poisson noise (``_steady``): the requests of the
last six windows (``STEADY_RUNS`` runs of ``descend_windows``), ``STEADY_BOUND`` standard errors of
that count up where a rung must carry it (a descent's rung, a climb's target) and down where it is to
make the ladder climb; the test that lets a window count as quiet because a lower rung carries its load
takes the mean (``_lower_carries``), and so does a descent to a rung that was seen to hold the steady
load (``held_load``, below). Three-second means of a steady 10 requests/s range 7-13, about the distance
between a rung's climb and descent points: compared as they were, a steady load whose doubling filled
115% of the 70% share of Rotten Tomatoes' rung 0 moved the served ladder's rung 15-16 times in 90 s,
and three lull seconds in a 1x step (9-11/s in 14.9/s) took ladders down to rung 0 just before a 2x
step, which then found it full (measured). One standard error each way asks a move to see the count
about 1.3 standard errors from the mean instead of 0.4: in scripted windows at that load, 9-20 moves
in 300 windows against 50-75, and served, 1-4 in 22.5 s at 104-117% of that point. Two standard
errors kept ladders from climbing at a 1x step in simulation. The lower bound also makes the
headroom's climb at a step about a window later, and in a TREC run (40) instances that had not yet
climbed met the 1x step on rung 0 and jumped to the top (``benchmarks/spike/README.md``).

Over three seconds with the bounds the band between climbing and descending grew so wide that the
return to rung 0 after a spike failed: TREC's half load doubled filled 68% of rung 0 in one run (41),
under the share's 70% but not one standard error up (79%), so the ladder that served rung 0 at that
load before the spike stayed at rung 2 after it, every instance, through the light step. Two changes:
the steady load spans six seconds, whose standard error is 30% smaller, so the bounds widen the band
less; and a rung seen to hold the steady load before (no more than its ``held_load``) is tested on the
steady load's mean, as the climb test that kept the ladder there then tested a bound under it. At TREC
41's figures the ladder comes back in the light step's sixth window, and a steady load at Rotten
Tomatoes' rung-0 boundary moves the rung 8-14 times in 300 scripted windows, against 15-20 over three
seconds (``tests/test_slo.py``); a three-second lull in a 1x step still leaves the ladder off rung 0
(its six-second mean is not a lull). Served, TREC's ladders were back at rung 0 3.8-9.2 s into the
light step wherever its doubling filled under 70% of rung 0 (``benchmarks/spike/README.md``). The price:
a step shows in a six-second steady load later, so the headroom's climb at a 1x step came 4-6 s into
it (the load of now and the backlog check still climb at once where the rung cannot carry the step
itself), and rung 0's quiet answers of those seconds must not count as a load it held (``_learn_held``).

A step detector takes part of that price back: where the last ``descend_windows`` windows' count differs from
the count of the windows before by ``STEP_Z`` standard errors of the difference of two Poisson rates,
the steady load is the last windows' alone (``_steady_loads``), so a step shows in the steady load three
seconds in, as before, while a steady load keeps its six seconds. In scripted Poisson schedules (100
per workload, the capacities of five served runs; a script, not in the repository) the ladder left rung
0 at the 1x step in a median 2-5 windows against 2-6 (TREC 46's figures: 3 against 4), and was back at
rung 0 for good in the last step in a median 4-5 windows against 5-6 where its fill is under the share
(a step down shows sooner too; at TREC 41's 68% fill, 8 either way, and not back in 22 schedules of 100
against 19). At Rotten Tomatoes' rung-0 boundary it moved the rung 9-23 times in 300 windows (seeds 0-9)
against 8-15: the detector's false alarms. At 2 standard errors the median there was 19 moves against
13; at 3 the return was no faster than without the detector. Served, the first 1x step's p99 was within
the target in 7 of 10 ladders, against 6 of 12 without it (``benchmarks/spike/README.md``).

A 2x step still showed in the steady load only in its second or third window: three windows of which
one is the step's are seldom 2.5 standard errors from the three before. The step's first second lands
on the rung chosen for 1x, and TREC 51's ladder, on rung 2, climbed 1.8 s in and missed the step (259
ms in its first second against 198). So the last window alone is tested too, for a rise only, at
``STEP_Z_WINDOW`` standard errors, and taken where it is also above the steady load the three-window
test gives (a larger step in the last three windows stands): at TREC's 1x (26/s) a doubling is 3.4
standard errors in one window.
In scripted schedules (60 per workload, the capacities of six served runs; a script, not in the
repository) the ladder climbed from the 1x rung in the 2x step's first window in 40-48 of 60 TREC
schedules against 2-4, in 13-24 of 60 Rotten Tomatoes ones (half TREC's rate: a doubling is 2.4
standard errors in one window) against 5-15; the rung changes at Rotten Tomatoes' rung-0 boundary did
not change (13-16 for seeds 0-2), nor did the return (median 3-8 windows either way). A fall in one
window is a lull, not a step down: a descent waits for three windows of it.

The gap between the two fractions, the run of quiet windows needed to descend and the capacity check
are the hysteresis: a load near a boundary does not make the rung flap. A window without requests
counts as quiet. Requests that carry ``force_full`` and cohorts the policy pins stay at rung 0 whatever the
rung (the orchestrator applies that), and each rung's guarantee holds at every moment, since the
ladder was certified for all rungs at once.
"""

from __future__ import annotations

import math
import re
import threading
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# The share of the instances' time spent in executes from which a window shows what its rung carries:
# below it the answered rate is the load, not a limit (dynamic batching keeps a saturated instance busy).
SATURATED = 0.8

# Poisson standard errors between the steady load and the bound a throughput test takes of it: a climb
# on it asks its lower bound to pass the rung's climb point, a rung is said to carry it where it carries
# its upper bound (module doc).
STEADY_BOUND = 1.0

# The steady load is the load of the last STEADY_RUNS x descend_windows windows (module doc)...
STEADY_RUNS = 2
# ...or of the last descend_windows alone where their count differs from the windows' before by this
# many standard errors of the difference of two Poisson rates: a step (module doc)...
STEP_Z = 2.5
# ...or of the last window alone where its count rises over the windows' before by this many: a step
# seen a window after it came, not three (module doc).
STEP_Z_WINDOW = 3.0


def is_expected_cost(value: object) -> bool:
    """A rung's expected compute fraction per row, as the controller takes it: a positive finite number."""
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class SloConfig:
    p99_ms: float  # the latency target
    window_s: float = 1.0
    climb_at: float = 0.8  # climb when the estimate passes this fraction of the target
    descend_at: float = 0.5  # descend when it stays below this fraction...
    descend_windows: int = 3  # ...for this many windows in a row
    descend_load: float = 0.8  # ...and the load is under this share of what the lower rung carries
    shed_max_exit: int | None = None  # past the top rung and over the target, cap every row here
    # What a request costs whatever its depth (parsing, the batch's calls, responses), in the compute
    # fractions the rungs' costs are in: rung times scale as fixed_cost + compute (module doc). Measured
    # on TREC: a top rung of 0.122 of the compute carried 5.1x the full model's rows, (1 + f) / (0.122 +
    # f) = 5.1 for f = 0.09.
    fixed_cost: float = 0.1
    # Requests per second each rung carries, rung 0 first, measured on this deployment at its request
    # size (``offramp bench --spike`` measures each rung alone at saturation); empty: learnt from
    # windows that overload a rung and estimated for the others from the rungs' work (module doc).
    rung_capacity: tuple[float, ...] = ()
    climb_load: float = 0.9  # climb before the latency shows it where the load passes this share of that
    # The multiple of the steady load (the load of the last few windows, module doc) that a rung must
    # carry (with the margins above) to be served: 2 keeps the ladder on a rung that a doubling of the
    # load within a second finds able to carry it, at the price of a higher rung (more risk, still
    # certified) at a steady load. 1: the load of now, or the steady load where higher.
    headroom: float = 1.0
    # The share of what a rung carries that the risen load (headroom x the steady load) may fill for the
    # rung to be served, where a load of now may fill descend_load (and the rung of now is left where it
    # passes this times climb_load / descend_load); None: descend_load. A throughput margin is not a
    # latency margin at a step's onset: of 26 measured 2x onsets, the ones that found their rung at 49-58%
    # of what it carries (measured alone, at saturation) held the target in 12 of 13, at 74-89% in 6 of
    # 10; the half load's doubling fills rung 0 to 54-65%, which the return to rung 0 needs. 0.7 lies
    # between (``offramp bench --spike`` gives its ladders 0.7).
    headroom_load: float | None = None
    # The same share for the rungs above rung 0; None: headroom_load. Only rung 0's share is held up by
    # the return after a spike (above); a ladder above rung 0 is there because load came, and a 2x onset
    # found its rung at 52-60% in the runs that still missed it (TREC 51, 52, Rotten Tomatoes 27). At
    # 0.5 the 1x rung is one the doubling fills to about half or less (module doc).
    headroom_load_above: float | None = None

    def __post_init__(self) -> None:
        if not self.p99_ms > 0 or not self.window_s > 0:
            raise ValueError("the SLO's p99 target and its window must be positive")
        if not 0 < self.descend_at < self.climb_at <= 1:
            raise ValueError("need 0 < descend_at < climb_at <= 1 (the gap is the hysteresis)")
        if self.descend_windows < 1:
            raise ValueError("descend_windows must be at least 1")
        if not 0 < self.descend_load <= 1:
            raise ValueError("descend_load must lie in (0, 1]")
        if not (math.isfinite(self.fixed_cost) and self.fixed_cost >= 0):
            raise ValueError("fixed_cost must be a finite compute fraction >= 0")
        if not all(math.isfinite(c) and c > 0 for c in self.rung_capacity):
            raise ValueError(
                f"each rung's capacity must be a positive number of requests/s: {self.rung_capacity}"
            )
        if not self.descend_load < self.climb_load <= 1:
            raise ValueError("need descend_load < climb_load <= 1 (the gap is the hysteresis)")
        if not (math.isfinite(self.headroom) and self.headroom >= 1):
            raise ValueError(f"headroom must be a load multiple >= 1: {self.headroom}")
        for name in ("headroom_load", "headroom_load_above"):
            share = getattr(self, name)
            if share is not None and not 0 < share <= self.descend_load:
                raise ValueError(f"{name} must lie in (0, descend_load = {self.descend_load:g}]: {share}")

    def headroom_share(self, rung: int) -> float:
        """The share of what ``rung`` carries that the risen load may fill (``headroom_load`` at rung 0,
        ``headroom_load_above`` above it, ``descend_load`` where not given)."""
        above = self.headroom_load if self.headroom_load_above is None else self.headroom_load_above
        share = self.headroom_load if rung == 0 else above
        return self.descend_load if share is None else share

    def check_ladder(self, rungs: int) -> None:
        """Refuses measured capacities for another number of rungs than the ladder's ``rungs``."""
        if self.rung_capacity and len(self.rung_capacity) != rungs:
            raise ValueError(
                f"slo_rung_capacity gives {len(self.rung_capacity)} figures for a ladder of {rungs} rungs "
                "(rung 0 first): give one per rung of the policy served (offramp calibrate --ladder makes "
                "the rungs; offramp bench --spike measures what each carries)"
            )


@dataclass(frozen=True)
class SloWindow:
    """What one window measured and decided."""

    estimate_ms: float  # queue wait (the larger of the two below) + own p99; NaN: no request
    queue_ms: float  # mean queue wait of the window's requests
    own_p99_ms: float
    requests: int
    rung: int  # the rung served from this window's end on
    shedding: bool
    missed: bool  # at the top rung and still over the target
    backlog_ms: float = math.nan  # the wait the requests pending at the window's end mean
    # Why the controller stays where it is, for whoever reads its metrics: the model's requests/s that
    # came in the window, the quiet windows in a row so far (a descent needs ``descend_windows``), and
    # the p99 predicted for the rung below at the window's figures (NaN at rung 0, or unknown).
    load_rps: float = math.nan
    quiet: int = 0
    below_p99_ms: float = math.nan


@dataclass
class SloController:
    """Decides the rung once per window from what ``record`` and ``queue`` report."""

    config: SloConfig
    top_rung: int  # the ladder's highest rung (0: a policy without a ladder)
    # () -> (total queue microseconds, requests answered, requests pending now), Triton's counters
    # and gauge for the model; None where unknown.
    queue: Callable[[], tuple[float, float, float] | None]
    clock: Callable[[], float]
    rung: int = 0
    shedding: bool = False
    history: list[SloWindow] = field(default_factory=list)
    capacity: dict[int, float] = field(default_factory=dict)  # rung -> requests/s it answered overloaded
    # rung -> the highest mean load (requests/s) of a run of ``descend_windows`` windows it answered
    # whole under ``descend_at`` of the target, and carries with the headroom (``_learn_held``)...
    held_load: dict[int, float] = field(default_factory=dict)
    # ...and the lowest load of a window it answered whole over ``climb_at`` since (``_holds``)
    overloaded_at: dict[int, float] = field(default_factory=dict)
    # Expected compute fraction per row of each rung, rung 0 first (the ladder's calibration); empty:
    # what a rung carries is known only once it was seen overloaded.
    costs: tuple[float, ...] = ()
    instances: int = 1  # the model's orchestrator instances, which serve Triton's one queue for it
    # Expected compute fraction per row while shedding (``shed_compute``); None: unknown, and shedding
    # stops after quiet windows alone.
    shed_cost: float | None = None

    def __post_init__(self) -> None:
        if self.costs and (
            len(self.costs) != self.top_rung + 1 or not all(map(is_expected_cost, self.costs))
        ):
            raise ValueError(f"need a positive expected compute for each of {self.top_rung + 1} rungs")
        if self.instances < 1:
            raise ValueError("instances must be at least 1")
        if self.shed_cost is not None and not (self.costs and is_expected_cost(self.shed_cost)):
            raise ValueError("a shed cost needs the rungs' costs, and must be a positive compute fraction")
        self.config.check_ladder(self.top_rung + 1)
        self.capacity = {**dict(enumerate(self.config.rung_capacity)), **self.capacity}
        self._lock = threading.Lock()
        # This controller sees its own instance's executes alone; the model's other instances, in processes
        # of their own, serve the same queue alike. What the model answered comes from Triton's counters.
        self._own_ms: list[float] = []  # this window's per-request times in this instance
        self._busy_s = 0.0  # this window's execute seconds in this instance...
        self._served = 0  # ...and the requests it answered
        self._answered: deque[tuple[float, int]] = deque()  # (when, requests) of this instance's executes
        # (when, the model's answered total, its requests pending) as read off Triton's metrics
        self._readings: deque[tuple[float, float, float]] = deque()
        self._service_s = math.nan  # seconds of an instance per request, the last window with requests
        self._last_own_p99 = math.nan
        self._last_own_mean = math.nan
        self._window_start = self._checked_at = self.clock()
        self._queue_start = self.queue()
        if self._queue_start is not None:
            self._readings.append((self._window_start, *self._queue_start[1:]))
        self._quiet = 0  # quiet windows in a row...
        # ...and, of those with requests, the load, time per request, own p99 and own mean
        self._quiet_seen: list[tuple[float, float, float, float]] = []
        self._moved = False  # the rung moved in the window now open
        self._held_run: list[float] = []  # loads of the run of windows at this rung under descend_at so far
        # The model's loads of the last ``STEADY_RUNS`` x ``descend_windows`` windows, for the steady load
        # ``headroom`` multiplies (``_demand``)...
        self._recent_loads: deque[float] = deque(maxlen=STEADY_RUNS * self.config.descend_windows)
        # ...and, where the last window was over ``climb_at``, its rung and whether its instances were
        # saturated (not shedding): a second such window in a row at a rung climbs with idle instances,
        # or replaces a measured capacity with saturated ones (``_decide``). None: it was not.
        self._last_over: tuple[int, bool] | None = None

    def record(self, seconds: float, requests: int) -> None:
        """One execute's time, the time of each of its requests (they wait for the whole batch)."""
        now = self.clock()
        with self._lock:
            self._own_ms.extend([seconds * 1000.0] * requests)
            self._busy_s += seconds
            self._served += requests
            self._answered.append((now, requests))
            self._forget_answers_before(now - self.config.window_s)

    def _backlog_ms(self, pending: float) -> float:
        """The wait ``pending`` requests mean for one arriving now: the instances share them."""
        if math.isnan(self._service_s):
            return math.nan
        return pending * self._service_s / self.instances * 1000.0

    def due_in(self) -> float:
        """Seconds until ``tick`` has work: the window's end, or the next backlog check below the top rung."""
        with self._lock:
            due = self._window_start + self.config.window_s
            if self.rung < self.top_rung:
                due = min(due, self._checked_at + self.config.window_s / 4)
        return due - self.clock()

    def tick(self) -> SloWindow | None:
        """Closes the window when it is due and returns what it decided; in between, every quarter
        window, checks the backlog (module doc). Called from a thread of its own, at ``due_in``: both
        read Triton's metrics page, which no request should wait for."""
        now = self.clock()
        with self._lock:
            due = now - self._window_start >= self.config.window_s
            check = (
                not due and now - self._checked_at >= self.config.window_s / 4 and self.rung < self.top_rung
            )
            if check:
                self._checked_at = now
            if due:
                own, self._own_ms = self._own_ms, []
                busy, served, self._busy_s, self._served = self._busy_s, self._served, 0.0, 0
                self._window_start = self._checked_at = now
                steady = not self._moved  # served at one rung from start to end
        if not due:
            if check:
                self._check_backlog()
            return None
        if served:
            self._service_s = busy / served
        queue_now = self.queue()
        with self._lock:
            answered, load = self._model_rates(now, queue_now)
            self._recent_loads.append(load)
        queue_ms = backlog_ms = math.nan
        if queue_now is not None:
            backlog_ms = self._backlog_ms(queue_now[2])
            if self._queue_start is not None:
                waited_us, answered = (
                    b - a for a, b in zip(self._queue_start[:2], queue_now[:2], strict=True)
                )
                queue_ms = waited_us / answered / 1000.0 if answered > 0 else math.nan
        self._queue_start = queue_now
        own_p99 = float(np.percentile(own, 99)) if own else math.nan
        own_mean = float(np.mean(own)) if own else math.nan
        if own:
            self._last_own_p99, self._last_own_mean = own_p99, own_mean
        waits = [w for w in (queue_ms, backlog_ms) if not math.isnan(w)]
        estimate = max(waits, default=0.0) + own_p99 if own else math.nan
        saturated = self._saturated(busy, self.config.window_s)
        own_times = (own_p99, own_mean)
        window = self._decide(
            estimate, queue_ms, backlog_ms, own_times, len(own), (answered, load), saturated, steady
        )
        self._moved = False  # a move at the window's close is where the next window starts
        self.history.append(window)
        return window

    def _saturated(self, busy_s: float, elapsed_s: float) -> bool:
        """This instance spent at least ``SATURATED`` of ``elapsed_s`` in executes (``busy_s`` of them);
        the others, serving the same queue, alike."""
        return busy_s >= SATURATED * elapsed_s

    def _model_rates(self, now: float, reading: tuple[float, float, float] | None) -> tuple[float, float]:
        """Requests per second the model answered, all its instances, and requests per second that came
        to it (answered plus the growth of its queue), over about the last window (the lock held): from
        Triton's counter and gauge read now (``reading``, as ``queue`` returns it) against the reading a
        window ago; else this instance's answers times the instances, for both. A rung near what it
        carries answers little more than that while its queue grows: the arrivals show the step, the
        answers lag it (a 2x step on Rotten Tomatoes stayed at rung 0 for two seconds)."""
        if reading is not None:
            self._readings.append((now, *reading[1:]))
            while len(self._readings) > 1 and self._readings[1][0] <= now - self.config.window_s:
                self._readings.popleft()  # the oldest kept is the newest at least a window old
            then, answered_then, pending_then = self._readings[0]
            if now > then:
                answered = (reading[1] - answered_then) / (now - then)
                return answered, max(answered, answered + (reading[2] - pending_then) / (now - then))
        self._forget_answers_before(now - self.config.window_s)
        answered = sum(requests for _, requests in self._answered) * self.instances / self.config.window_s
        return answered, answered

    def _forget_answers_before(self, since: float) -> None:
        """Drops this instance's answers older than ``since`` (the lock held)."""
        while self._answered and self._answered[0][0] < since:
            self._answered.popleft()

    def _steady(self, side: int) -> float:
        """The steady load (requests/s over the windows of :meth:`_steady_loads`),
        ``side`` (+1: upper, -1: lower, 0: the mean) ``STEADY_BOUND`` Poisson standard errors of its count
        away from the mean."""
        loads = self._steady_loads()
        if not loads:
            return 0.0
        seconds = len(loads) * self.config.window_s
        count = float(np.sum(loads)) * self.config.window_s  # requests that came
        return max(0.0, count + side * STEADY_BOUND * math.sqrt(max(count, 1.0))) / seconds

    def _steady_loads(self) -> list[float]:
        """The loads (requests/s per window) the steady load is of: the last ``STEADY_RUNS`` x
        ``descend_windows`` windows, or the last ``descend_windows`` alone where their rate differs from
        the rate of the windows before by ``STEP_Z`` standard errors; or the last window alone where its
        rate rises over the rate of the windows before by ``STEP_Z_WINDOW`` and over those (module doc)."""
        loads = list(self._recent_loads)
        steady = loads
        recent, before = loads[-self.config.descend_windows :], loads[: -self.config.descend_windows]
        if before and abs(self._step_z(recent, before)) >= STEP_Z:
            steady = recent
        last, earlier = loads[-1:], loads[:-1]
        if earlier and self._step_z(last, earlier) >= STEP_Z_WINDOW and last[0] > np.mean(steady):
            steady = last
        return steady

    def _step_z(self, recent: Sequence[float], before: Sequence[float]) -> float:
        """How many standard errors of the difference of two Poisson rates the rate of the ``recent``
        windows' loads lies above that of the windows ``before`` (negative: below)."""
        window_s = self.config.window_s
        counts = [max(float(np.sum(part)) * window_s, 1.0) for part in (recent, before)]
        seconds = [len(part) * window_s for part in (recent, before)]
        rates = [c / t for c, t in zip(counts, seconds, strict=True)]
        error = math.sqrt(sum(c / t**2 for c, t in zip(counts, seconds, strict=True)))
        return (rates[0] - rates[1]) / error

    def _demand(self, rung: int, load: float, steady: float) -> float:
        """The requests/s ``rung`` must carry to be served at ``load`` requests/s now: that load, or
        ``headroom`` times the ``steady`` load (a bound of it, :meth:`_steady`) where more. The
        headroom multiplies a steady load, not a one-second count: at TREC's half load (13.6/s) counts of
        6 to 21 per second came, and twice the highest crossed what rung 0 carries, which kept the ladder
        off rung 0 after a spike (measured with a headroom of 2). A step in the load shows in the count
        of now, at once, as without headroom. The risen load is scaled by ``descend_load`` over the
        rung's headroom share (:meth:`SloConfig.headroom_share`), so that every throughput test, made
        with the margins of a load of now, holds it to that share of the rung."""
        config = self.config
        # The risen load against the throughput margins: filling the rung's share counts as filling
        # descend_load of it (headroom >= 1, share <= descend_load).
        risen = config.headroom * steady * config.descend_load / config.headroom_share(rung)
        return max(load, risen)

    def _near_capacity(self, load: float) -> bool:
        """Whether ``load`` requests/s coming (what ``_demand`` makes of it) pass ``climb_load`` of what the
        rung of now carries: a queue builds within seconds, before the latency shows it (module doc).
        Unknown capacity (inf): never."""
        demand = self._demand(self.rung, load, self._steady(-1))
        return demand > self.config.climb_load * self.carries(self.rung)

    def _check_backlog(self) -> None:
        """Between windows: to the top rung at once where the pending requests alone put a request
        arriving now over the target; else a climb where the requests that came in the last window's
        length, a window sliding by quarters, pass ``climb_load`` of what the rung carries (module doc)."""
        reading = self.queue()
        backlog_ms = math.nan if reading is None else self._backlog_ms(reading[2])
        now = self.clock()
        with self._lock:
            answered, load = self._model_rates(now, reading)
            if self.rung == self.top_rung:
                return
            if backlog_ms + self._last_own_p99 > self.config.p99_ms:  # False where either is NaN
                elapsed = now - self._window_start
                if elapsed > 0 and self._saturated(self._busy_s, elapsed):
                    self.capacity.setdefault(self.rung, answered)
                self._move(self.top_rung)
            elif self._near_capacity(load):
                self._move(self._rung_that_carries(load))

    def _decide(
        self,
        estimate: float,
        queue_ms: float,
        backlog_ms: float,
        own: tuple[float, float],  # this window's own p99 and mean, ms
        requests: int,  # this instance's
        rates: tuple[float, float],  # the model's requests per second, answered and arriving (_model_rates)
        saturated: bool,
        steady: bool,  # the window was served at the rung of now from start to end
    ) -> SloWindow:
        config, target = self.config, self.config.p99_ms
        busy = not math.isnan(estimate)
        missed = busy and self.rung == self.top_rung and estimate > target
        answered, load = rates
        self._learn_held(estimate if steady and not self.shedding else math.nan, load, saturated)
        over_before, self._last_over = self._last_over, None
        if busy and estimate > config.climb_at * target:
            self._reset_quiet()
            overloaded = saturated and not self.shedding
            self._last_over = (self.rung, overloaded)
            if overloaded:  # what this rung answers overloaded is what it carries
                # A measured capacity gives way to two such windows in a row at the rung, not to one: a
                # step's first window answers the rate of its burst, not what the rung carries (module doc).
                if not config.rung_capacity or over_before == (self.rung, True):
                    self.capacity[self.rung] = answered
            if self.rung < self.top_rung:
                # With idle instances and under the target, a second such window in a row (module doc).
                if saturated or estimate > target or over_before == (self.rung, False):
                    over = estimate > target and saturated  # a backlog, which drains fastest at the top
                    self._move(self.top_rung if over else self._rung_that_carries(load))
            elif config.shed_max_exit is not None:  # shedding is the step past the top rung
                self.shedding = True
        elif busy and self.rung < self.top_rung and self._near_capacity(load):
            self._move(self._rung_that_carries(load))
        elif not busy or estimate < config.descend_at * target or self._lower_carries(load):
            self._quiet += 1
            if requests:
                self._quiet_seen.append((load, self._service_s, *own))
            if self._quiet >= config.descend_windows:
                self._end_quiet_run()
        else:
            self._reset_quiet()
        below_p99_ms = self._predicted_p99(self.rung - 1, load) if self.rung > 0 else math.nan
        return SloWindow(
            estimate, queue_ms, own[0], requests, self.rung, self.shedding, missed, backlog_ms,
            load, self._quiet, below_p99_ms,
        )  # fmt: skip

    def _end_quiet_run(self) -> None:
        """After ``descend_windows`` quiet windows: stop shedding where the top rung alone is predicted to
        fit, else descend (:meth:`_descent`); judged on the worst of the run (module doc)."""
        seen = np.array(self._quiet_seen, dtype=float).reshape(-1, 4)  # (windows with requests, 4)
        worst_load, service_s, *worst_own = seen.max(axis=0) if len(seen) else (0.0, *[math.nan] * 3)
        mean_load = float(seen[:, 0].mean()) if len(seen) else 0.0
        self._reset_quiet()
        if self.shedding:
            if self.shed_cost is None or self._fits(self.rung, worst_load, service_s, worst_own):
                self.shedding = False
        elif self.rung > 0:
            self._move(self._descent(worst_load, mean_load, service_s, worst_own))

    def _descent(self, worst_load: float, mean_load: float, service_s: float, own: Sequence[float]) -> int:
        """Where a run of quiet windows (their worst load, mean load, time per request and own times)
        takes the ladder: the lowest rung that carries the worst load with the ``descend_load`` margin and
        holds the mean load (:meth:`_holds`, as rung 0 held the light load before a spike); else the next
        rung down where predicted to fit (:meth:`_fits`); else the rung of now. The prediction alone came
        down a rung at a time and kept TREC's ladders off rung 0 for the whole light step after a spike:
        M/M/c with the light-load time of an execute and exponential service put rung 0 at 150-550 ms at
        14 requests/s, which it had answered at 121 ms before the spike (measured)."""
        upper, mean = self._steady(+1), self._steady(0)
        for rung in range(self.rung):
            # A rung seen to hold the steady load is tested on its mean, others on its upper bound.
            steady = mean if mean <= self.held_load.get(rung, 0.0) else upper
            if self._carries_with_margin(rung, worst_load, steady) and self._holds(rung, mean_load):
                return rung
        below = self.rung - 1
        if self._carries_with_margin(below, worst_load, upper) and self._fits(
            below, worst_load, service_s, own
        ):
            return below
        return self.rung

    def _carries_with_margin(self, rung: int, load: float, steady: float) -> bool:
        """Whether ``rung`` carries ``load`` requests/s (what ``_demand`` makes of it with the ``steady``
        load, a bound of it) within ``descend_load`` of what it carries: the throughput test of every
        climb's and descent's rung."""
        return self._demand(rung, load, steady) < self.config.descend_load * self.carries(rung)

    def _holds(self, rung: int, load: float) -> bool:
        """Whether ``rung`` was seen to hold a mean ``load`` requests/s: up to ``1 / descend_load`` of a
        load it held quietly, under half the target (``held_load``; a light load 25% higher barely
        queues more, and a run's mean at the same load as before is as often over it as under: on TREC
        the ladder needed three tries, 11 s, to get back to rung 0 at the light load it held before the
        spike, measured), but not within ``descend_load`` of a load it was seen over ``climb_at`` at
        (``overloaded_at``). Without requests (0/s): any rung."""
        held = self.held_load.get(rung, 0.0) / self.config.descend_load
        return load <= min(held, self.config.descend_load * self.overloaded_at.get(rung, math.inf))

    def _learn_held(self, estimate: float, load: float, saturated: bool) -> None:
        """What a window served at one rung from start to end (``estimate``; NaN: it was not, or had no
        request) shows: a run of ``descend_windows`` of them quiet by their latency (under ``descend_at``
        of the target) at a mean ``load`` is a load the rung holds with room to spare where the rung
        also carries it with the headroom's margins (``_carries_with_margin`` at that mean), and clears a load
        under it that the rung was seen overloaded at (one slow window); one over ``climb_at`` with its
        instances saturated records its load as one the rung was overloaded at (with idle instances it is
        slow requests, not load: as for ``capacity``, module doc). Runs under ``climb_at`` alone were no
        evidence: on TREC rung 0 answered the 1x step's first seconds just under it, and after the spike
        the ladder went back to rung 0 at that load and climbed again (measured)."""
        if math.isnan(estimate):
            self._held_run.clear()
        elif estimate > self.config.climb_at * self.config.p99_ms:
            self._held_run.clear()
            if saturated:
                self.overloaded_at[self.rung] = min(self.overloaded_at.get(self.rung, math.inf), load)
        elif estimate >= self.config.descend_at * self.config.p99_ms:
            self._held_run.clear()
        else:
            self._held_run.append(load)
            if len(self._held_run) >= self.config.descend_windows:
                held = float(np.mean(self._held_run[-self.config.descend_windows :]))
                # With room to spare by throughput too (the headroom's test at that mean): rung 0 answered
                # a 1x step's first seconds quietly before the steady load showed the step, and a lull
                # later in the step took the ladder back there on the mean (Rotten Tomatoes 24, measured).
                if self._carries_with_margin(self.rung, held, held):
                    self.held_load[self.rung] = max(self.held_load.get(self.rung, 0.0), held)
                if held > self.overloaded_at.get(self.rung, math.inf):
                    del self.overloaded_at[self.rung]

    def _move(self, rung: int) -> None:
        """Serve ``rung`` from now on; a run of quiet windows or of windows that fit starts anew."""
        if rung != self.rung:
            self._moved = True
            self._held_run.clear()
        self.rung = rung
        self._reset_quiet()

    def _reset_quiet(self) -> None:
        self._quiet = 0
        self._quiet_seen = []

    def carries(self, rung: int) -> float:
        """Requests per second ``rung`` carries: as seen overloaded, else estimated from the rungs that
        were by expected compute (the lowest estimate), else unknown (inf)."""
        if rung in self.capacity:
            return self.capacity[rung]
        if not self.costs or not self.capacity:
            return math.inf
        return min(
            seen * self._work(self.costs[r]) / self._work(self.costs[rung])
            for r, seen in self.capacity.items()
        )

    def _work(self, compute: float) -> float:
        """What a request of ``compute`` (an expected compute fraction per row) costs, fixed part included."""
        return self.config.fixed_cost + compute

    def _rung_that_carries(self, load: float) -> int:
        """Climbing from an overloaded rung: the next one up, or the first above it estimated to carry
        ``load`` with the descent's margin and within the latency a climb answers (the top where none
        is). Where the window's own p99 alone is over that latency, no rung's prediction fits (the own
        p99 is not scaled: slow requests of a light load, not a queue), and the top rung would answer
        them no faster than the next: the climb goes by what the rungs carry alone. Before, one slow
        second at half load after a spike sent the ladder from rung 0 to the top (measured on TREC)."""
        # Unknown (NaN) own p99: the prediction decides, as _fits does with unknown times.
        predictable = not self._last_own_p99 >= self.config.climb_at * self.config.p99_ms
        upper = self._steady(+1)
        for rung in range(self.rung + 1, self.top_rung + 1):
            if self._carries_with_margin(rung, load, upper) and (not predictable or self._fits(rung, load)):
                return rung
        return self.top_rung

    def _fits(
        self,
        rung: int,
        load: float,
        service_s: float | None = None,
        own: Sequence[float] | None = None,
    ) -> bool:
        """Whether ``rung`` is predicted to answer ``load`` requests per second under ``climb_at`` of the
        target (:meth:`_predicted_p99`): a rung that is not would be climbed from again a window later
        (module doc). Unknown (no costs, no times yet): it fits."""
        return (
            not self._predicted_p99(rung, load, service_s, own) >= self.config.climb_at * self.config.p99_ms
        )

    def _predicted_p99(
        self,
        rung: int,
        load: float,
        service_s: float | None = None,
        own: Sequence[float] | None = None,
    ) -> float:
        """The p99 latency (ms) ``rung`` is predicted to answer ``load`` requests per second with, from a
        time per request and an own p99 and mean (ms) measured at the rung of now (this window's, or
        those given: a descent gives the worst of its quiet windows); NaN where unknown. The p99 of a wait
        plus an own time is near the p99 of the one with the heavier tail plus the other's mean, not the
        sum of both p99s (module doc)."""
        service_s = self._service_s if service_s is None else service_s
        own_p99, own_mean = (self._last_own_p99, self._last_own_mean) if own is None else own
        scale = self._time_scale(rung)
        if scale is None or math.isnan(service_s) or math.isnan(own_p99):
            return math.nan
        own_mean = own_p99 if math.isnan(own_mean) else own_mean
        service_s *= scale
        return max(
            own_p99 + mean_queue_wait_ms(load, service_s, self.instances),
            own_mean + queue_wait_ms(load, service_s, self.instances),
        )

    def _time_scale(self, rung: int) -> float | None:
        """A request's time at ``rung`` over its time now (the times are measured at the rung of now, or
        while shedding): by the measured capacities where the configuration gives them, else by the
        rungs' work; None where neither is known."""
        if self.config.rung_capacity and not self.shedding:
            return self.carries(self.rung) / self.carries(rung)
        if not self.costs:
            return None
        now = self.shed_cost if self.shedding and self.shed_cost is not None else self.costs[self.rung]
        return self._work(self.costs[rung]) / self._work(now)

    def _lower_carries(self, load: float) -> bool:
        """A rung below was seen overloaded at a load well above this one (a lower rung carries less than
        any above it, so that bounds the next one down): a window under ``climb_at`` counts as quiet
        then. Under a target of twice the light-load p99 the light load itself can sit over
        ``descend_at``, and the ladder stayed up after a spike had passed (measured on TREC). The steady
        load is taken at its mean here: this only lets a window count as quiet, and the descent it may
        lead to tests its rung with the upper bound itself. With the upper bound here, TREC's half load
        after a spike, whose own p99 at rungs 0 and 1 sat near half a tight target, broke the quiet runs
        and kept a ladder at rung 1 to the end (measured)."""
        mean = self._steady(0)
        return any(self._carries_with_margin(rung, load, mean) for rung in self.capacity if rung < self.rung)


def shed_compute(exit_rates: Sequence[float], exit_costs: Sequence[float], shed_max_exit: int) -> float:
    """Expected compute fraction per row of rules with exit shares ``exit_rates`` when every row is
    answered at ``shed_max_exit`` at the latest."""
    if len(exit_rates) != len(exit_costs):
        raise ValueError(f"{len(exit_rates)} exit shares for {len(exit_costs)} exits")
    cap = min(shed_max_exit, len(exit_costs) - 1)
    return float(sum(rate * exit_costs[min(k, cap)] for k, rate in enumerate(exit_rates)))


def _erlang_c(offered: float, servers: int) -> float:
    """The chance that an arrival waits in an M/M/c queue with ``offered`` busy servers on average."""
    # From the Erlang B recursion (no factorials): B(0) = 1, B(k) = a B / (k + a B).
    blocked = 1.0
    for k in range(1, servers + 1):
        blocked = offered * blocked / (k + offered * blocked)
    return blocked / (1.0 - offered / servers * (1.0 - blocked))


def queue_wait_ms(arrivals_per_s: float, service_s: float, servers: int, quantile: float = 0.99) -> float:
    """The ``quantile`` of the wait in an M/M/c queue (Erlang C): Poisson arrivals at ``arrivals_per_s``
    to ``servers`` instances taking ``service_s`` each per request; inf where they cannot keep up.

    ``P(wait > t) = C exp(-(c / s - lambda) t)``, C the chance of waiting at all. Exponential service
    overstates the wait of an orchestrator's nearly constant service time, so a rung predicted to fit
    does.
    """
    offered = arrivals_per_s * service_s  # busy instances, on average
    if offered >= servers:
        return math.inf
    if offered <= 0:
        return 0.0
    waits, tail = _erlang_c(offered, servers), 1.0 - quantile
    if waits <= tail:
        return 0.0
    return math.log(waits / tail) / (servers / service_s - arrivals_per_s) * 1000.0


def mean_queue_wait_ms(arrivals_per_s: float, service_s: float, servers: int) -> float:
    """The mean wait in the same M/M/c queue, ``C / (c / s - lambda)``; inf where it cannot keep up."""
    offered = arrivals_per_s * service_s
    if offered >= servers:
        return math.inf
    if offered <= 0:
        return 0.0
    return _erlang_c(offered, servers) / (servers / service_s - arrivals_per_s) * 1000.0


def queue_counters_from_metrics(text: str, model: str) -> tuple[float, float, float] | None:
    """``model``'s total queue microseconds, successful requests and requests pending now, summed over
    its versions, from Triton's Prometheus page; None where the page has no queue counters for it (a
    Triton without the pending gauge reads 0 pending)."""
    totals = []
    for name in (
        "nv_inference_queue_duration_us",
        "nv_inference_request_success",
        "nv_inference_pending_request_count",
    ):
        pattern = rf'^{name}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$'
        values = [float(v) for v in re.findall(pattern, text, re.MULTILINE)]
        if not values and name != "nv_inference_pending_request_count":
            return None
        totals.append(sum(values))
    return totals[0], totals[1], totals[2]


def triton_queue_counters(
    metrics_url: str, model: str, timeout_s: float = 2.0
) -> Callable[[], tuple[float, float, float] | None]:
    """A reader of ``model``'s queue counters on Triton's metrics page (None when it cannot be read: the
    controller then goes by the orchestrator's own times alone)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy

    def read() -> tuple[float, float, float] | None:
        try:
            with opener.open(metrics_url, timeout=timeout_s) as response:
                return queue_counters_from_metrics(response.read().decode(), model)
        except OSError:
            return None

    return read
