"""``offramp bench --workload generation`` (``offramp generate bench``): the decoding modes side by side.

First the draft is chosen again on the server (``generation_calibrate.draft_for_served_steps``): the
generator serves the calibrated policy with a probe draft (``served_probe``: a long one from the deepest
early exit) while the benchmark times, at each of the calibration's timing batches (that many 64-token
completions at once), a served ``full`` step and a served pass of the probe draft. Through the two, a
served step's wall time is a factor times its parts' CPU time (compute slowed by the cores it shares
with Triton's response path and the client) plus a cost per step (the loop, a response per row, gRPC,
the client); the draft's cost model takes every step so, and the choice it makes is the policy
measured below. The calibration times the parts alone.

Then one embedded tritonserver serves the code model's generator; every mode is measured through it, on
the same prompts, at each concurrency level, in interleaved rounds (the mode order rotates each
round), with ratios formed within a round and their medians reported. Prompts are next-line tasks
from the held-out test modules (``offramp.build.code_data``: a function cut at a random line).
Two workloads:

- ``next_line``: complete up to the newline (stop ``["\\n"]``), at most 64 tokens; exact match with
  the true line is measured;
- ``64_tokens``: 64 tokens whatever comes (no stop): the decoding itself, with less prefill per token.

Client side (``GenerationClient``, one gRPC stream, ``c`` requests in flight): tokens per second
over the run's wall time, time per token after the first (per completion, first to last token;
p50 and p99 over completions), time to first token, exact match, token identity of
``self_speculative`` with ``full`` and token disagreement of ``confident`` with ``full``, prompt by
prompt. Server side (the generator's counters on the metrics page): drafts and acceptances; tokens
per verify pass are the tokens each ``self_speculative`` step streamed per row.

perf_analyzer (``--streaming``) drives each mode too, at each concurrency, on the ``64_tokens``
workload: its completed requests per second times the tokens per request the server counted.

The outside reference: the same checkpoint through transformers' ``generate``, greedy, at batch 1,
plain and with ``assistant_early_exit`` (its self-speculation from the policy's draft layer, the
policy's draft length, constant schedule), one torch thread, 64 new tokens per prompt.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offramp.client.cli.options import comma_list, option, positive_int

MODES = ("full", "self_speculative", "confident")
WORKLOADS = {"next_line": {"stop": json.dumps(["\n"]), "max_tokens": 64}, "64_tokens": {"max_tokens": 64}}
DEFAULT_OUT = Path("benchmarks/generation")
GOALS = {  # (mode, concurrency) -> tokens/s over full
    ("self_speculative", 1): 1.5,
    ("self_speculative", 8): 1.3,
    ("confident", 8): 2.0,
}


@dataclass(frozen=True)
class GenerationBenchConfig:
    """What ``offramp generate bench`` measures; each field is also its command-line option."""

    concurrency: tuple[int, ...] = option(
        (1, 8, 32), parse=comma_list(positive_int), help="concurrency levels"
    )
    workloads: tuple[str, ...] = option(tuple(WORKLOADS), parse=comma_list(str), help="next_line, 64_tokens")
    requests: int = option(64, help="completions per run (prompts from the test modules)")
    repeats: int = option(3, help="interleaved rounds per level")
    perf_analyzer: bool = option(True, flag="--no-perf-analyzer", help="no perf_analyzer runs")
    perf_window_ms: int = option(3000, help="perf_analyzer window; a run is three")
    reference_prompts: int = option(16, help="prompts for the transformers reference (0: none)")
    workdir: Path = option(Path(".cache/offramp"), help="builds, repository and server log")
    out: Path = option(DEFAULT_OUT, help="results and GENERATION.md")
    quick: bool = option(False, help="a tiny random model and a short sweep (pipeline check, minutes)")

    def __post_init__(self) -> None:
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ValueError(f"unknown workloads {sorted(unknown)}; known: {list(WORKLOADS)}")

    @classmethod
    def quick_defaults(cls) -> dict[str, Any]:
        return {
            "concurrency": (1, 4),
            "requests": 8,
            "repeats": 1,
            "perf_window_ms": 800,
            "reference_prompts": 2,
            "out": Path(".cache/offramp/generation-bench-quick"),
        }


def prompt_input_data(path: Path, prompts: Sequence[str]) -> Path:
    """perf_analyzer ``--input-data`` with one prompt per entry (``PROMPT``, BYTES ``[1]``)."""
    entries = [{"PROMPT": {"content": [prompt], "shape": [1]}} for prompt in prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path


# --- The model, its policy, its repository --------------------------------------------------------------


def prepared_model(config: GenerationBenchConfig) -> tuple[Any, Path, Any, Any]:
    """(artifacts, folder, policy, calibration settings): the code model (or, quick, a tiny random
    checkpoint) and its calibrated policy, each reused when cached."""
    from offramp.backend.generation_policy import GenerationPolicy
    from offramp.build.decoder import build_code_model, import_checkpoint
    from offramp.build.generation_calibrate import CalibrationSettings, calibrate_generation

    if config.quick:
        from offramp.build.code_data import stdlib_modules, train_tokenizer
        from offramp.build.decoder import tiny_random_checkpoint

        folder = config.workdir / "generation-quick"
        modules = [m for m in stdlib_modules() if m.name in ("textwrap", "json.encoder", "string")]
        tokenizer = train_tokenizer((m.text for m in modules), 384)
        checkpoint = tiny_random_checkpoint(folder / "checkpoint", "llama", tokenizer, context=256)
        artifacts, directory = import_checkpoint(checkpoint, folder / "artifacts", exit_layers=(1, 2, 4))
        settings = CalibrationSettings(
            calibration_tasks=48, test_tasks=16, acceptance_tasks=16, draft_lengths=(2, 3)
        )
    else:
        artifacts, directory = build_code_model(config.workdir)
        settings = CalibrationSettings()
    policy_file = directory / f"generation_policy-{_settings_key(settings)}.json"
    if policy_file.exists():
        policy = GenerationPolicy.load(policy_file)
        if policy.model_fingerprint == artifacts.fingerprint:
            return artifacts, directory, policy, settings
    print(f"calibrating {directory} (cached as {policy_file.name})", flush=True)
    from offramp.backend.exit_decoder import reproducible_gemm

    reproducible_gemm()  # as the server's stub decodes
    policy = calibrate_generation(directory, settings)
    policy.save(policy_file)
    return artifacts, directory, policy, settings


def _settings_key(settings: Any) -> str:
    from offramp.backend.exit_decoder import NUMERICS_VERSION
    from offramp.build.build_cache import build_key

    return build_key(**asdict(settings), numerics=NUMERICS_VERSION)


# --- Measuring ---------------------------------------------------------------------------------------------


def server_counters(metrics_url: str) -> dict[str, float]:
    """The generator's counters on the metrics page, summed over their labels (tokens also by mode)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        metrics_url, timeout=10
    ) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("offramp_generation_"):
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if sample.name == "offramp_generation_tokens_total":
                key = f"tokens:{sample.labels['mode']}"
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def run_once(
    url: str, model: str, tasks: Sequence[Any], workload: str, mode: str, concurrency: int, metrics_url: str
) -> dict:
    """One run: every task's prompt through ``mode`` at ``concurrency``; what it measured."""
    from offramp.client.generation_client import GenerationClient

    parameters = {**WORKLOADS[workload], "mode": mode}
    before = server_counters(metrics_url)
    started = time.perf_counter()
    completions = GenerationClient(url, model).stream(
        [(t.prompt, dict(parameters)) for t in tasks], concurrency
    )
    wall = time.perf_counter() - started
    after = server_counters(metrics_url)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    errors = [c.error for c in completions if c.error]
    per_token = [c.time_per_token for c in completions if c.time_per_token is not None]
    firsts = [c.time_to_first_token for c in completions if c.time_to_first_token is not None]
    steps = [n for c in completions for n in c.arrival_tokens[1:] if n]  # after the prefill's token
    tokens = sum(len(c.tokens) for c in completions)
    return {
        "workload": workload,
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(tasks),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ms_per_token_p50": 1e3 * _percentile(per_token, 50) if per_token else None,
        "ms_per_token_p99": 1e3 * _percentile(per_token, 99) if per_token else None,
        "ttft_ms_p50": 1e3 * _percentile(firsts, 50) if firsts else None,
        "ttft_ms_p99": 1e3 * _percentile(firsts, 99) if firsts else None,
        "exact_line_match": float(
            np.mean([c.text == t.target for c, t in zip(completions, tasks, strict=True)])
        ),
        "tokens_per_step": float(np.mean(steps)) if steps else None,
        "drafted": delta.get("offramp_generation_draft_tokens_total", 0.0),
        "accepted": delta.get("offramp_generation_accepted_tokens_total", 0.0),
        "verify_passes": delta.get("offramp_generation_verify_passes_total", 0.0),
        "exits": [list(c.exits) for c in completions],
        "completions": [list(c.tokens) for c in completions],
    }


def served_steps(
    url: str,
    model: str,
    tasks: Sequence[Any],
    policy: Any,
    batches: Sequence[int],
    metrics_url: str,
    rounds: int = 3,
) -> dict[int, Any]:
    """Batch size b -> two served steps of b rows (``ServedSteps``), wall seconds: a ``full`` step and a
    pass of ``self_speculative`` under ``policy``. b 64-token completions are sent at once (they prefill
    together, then step together); a step is the median over them of the time per token after the
    first, times the tokens each response brought; each the least of ``rounds`` (as the calibration
    takes its parts' least)."""
    from offramp.build.generation_calibrate import ServedSteps

    def least(mode: str, batch: int) -> dict:
        records = []
        for _ in range(rounds):
            record = run_once(url, model, tasks[:batch], "64_tokens", mode, batch, metrics_url)
            if record["errors"] or record["ms_per_token_p50"] is None:
                raise RuntimeError(f"the served {mode} step at batch {batch} failed: {record['first_error']}")
            record["step_s"] = record["ms_per_token_p50"] / 1e3 * record["tokens_per_step"]
            records.append(record)
        return min(records, key=lambda r: r["step_s"])

    steps = {}
    for batch in batches:
        full, speculative = least("full", batch), least("self_speculative", batch)
        steps[batch] = ServedSteps(full["step_s"], speculative["step_s"], policy.draft_exit,
                                   len(policy.draft_vocabulary),
                                   speculative["drafted"] / speculative["verify_passes"])  # fmt: skip
    return steps


def perf_analyzer_run(url: str, model: str, data: Path, mode: str, concurrency: int, metrics_url: str,
                      config: GenerationBenchConfig, raw: Path) -> dict:  # fmt: skip
    """perf_analyzer --streaming on the 64-token workload: requests/s and the tokens they brought."""
    from offramp.client.tools.perf_analyzer import PerfAnalyzerOptions, run_perf_analyzer

    # A window counts only the requests that end in it, and the running batch shares the server among its
    # streams: past 8 streams, each takes about concurrency / 8 times as long (measured: at 32, a 64-token
    # stream outlasted a 3-second window and perf_analyzer recorded no request).
    window_ms = config.perf_window_ms * max(1, concurrency // 8)
    options = PerfAnalyzerOptions(
        url=url, model=model, input_data=data, concurrency=concurrency, shapes={"PROMPT": [1]},
        measurement_interval_ms=window_ms, max_trials=3,
        request_parameters={"max_tokens": 64, "mode": mode}, extra_args=("--streaming",),
    )  # fmt: skip
    before = server_counters(metrics_url)
    run = run_perf_analyzer(
        options, raw / f"perf_{mode}_c{concurrency}.csv", timeout_s=120 + 6 * window_ms / 1000
    )
    after = server_counters(metrics_url)
    tokens = after.get(f"tokens:{mode}", 0.0) - before.get(f"tokens:{mode}", 0.0)
    requests = sum(v for k, v in after.items() if k == "offramp_generation_requests_total") - sum(
        v for k, v in before.items() if k == "offramp_generation_requests_total"
    )
    per_request = tokens / requests if requests else 0.0
    return {"mode": mode, "concurrency": concurrency, "requests_per_s": run.result.requests_per_s,
            "tokens_per_request": per_request, "tokens_per_s": run.result.requests_per_s * per_request,
            "p50_ms": run.result.p50_ms, "p99_ms": run.result.p99_ms}  # fmt: skip


def transformers_reference(
    directory: Path, artifacts: Any, policy: Any, tasks: Sequence[Any], completions: Mapping
) -> dict:
    """transformers' greedy ``generate`` at batch 1, plain and with ``assistant_early_exit``."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    early_layer = artifacts.exit_layers[policy.draft_exit]
    results: dict[str, Any] = {
        "draft_layer": early_layer,
        "draft_length": policy.draft_length,
        "prompts": len(tasks),
    }
    outputs: dict[str, list[list[int]]] = {}
    for name, extra in (("plain", {}), ("assistant_early_exit", {"assistant_early_exit": early_layer})):
        generated, seconds = [], 0.0
        for task in tasks:
            ids = torch.tensor([tokenizer.encode(task.prompt).ids])
            model.generation_config.num_assistant_tokens = policy.draft_length
            model.generation_config.num_assistant_tokens_schedule = "constant"
            with torch.inference_mode():
                started = time.perf_counter()
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=64,
                    min_new_tokens=64,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=artifacts.end_of_text,
                    **extra,
                )
                seconds += time.perf_counter() - started
            generated.append(out[0, ids.shape[1] :].tolist())
        outputs[name] = generated
        tokens = sum(len(g) for g in generated)
        results[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    results["speedup"] = results["assistant_early_exit"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    results["early_exit_same_as_plain"] = outputs["assistant_early_exit"] == outputs["plain"]
    served = completions.get("full", [])
    # ``served`` is empty where the 64-token workload did not run: nothing is compared then.
    compared = [(h, s) for h, s in zip(outputs["plain"], served, strict=False) if len(s) == 64]
    results["plain_same_as_served_full"] = {
        "compared": len(compared),
        "equal": sum(h == s for h, s in compared),
    }
    return results


# --- The sweep ----------------------------------------------------------------------------------------------


def draft_settings(policy: Mapping) -> dict:
    """What ``self_speculative`` decodes with under ``policy`` (a policy's fields), as the draft tables
    name it (the draft vocabulary by its size; 0: all tokens)."""
    return {"version": policy["version"], "draft_exit": policy["draft_exit"],
            "draft_length": policy["draft_length"], "draft_vocabulary": len(policy["draft_vocabulary"]),
            "draft_stop": policy["draft_stop"]}  # fmt: skip


def draft_choice_lines(summary: Mapping) -> list[str]:
    """The report's account of the draft: the calibration's choice from the parts alone, and the one made
    on the server from what serving makes of a step's parts, each with its predictions."""
    policy, calibrated = summary["policy"], summary.get("calibrated_draft")
    served = policy["provenance"].get("draft_served")
    if calibrated is None or served is None:  # a summary from before the served choice
        return []
    parts = served["step_seconds"]

    def row(table: Sequence[Mapping], draft: Mapping) -> Mapping:
        everything = max(r["draft_vocabulary"] for r in table)  # an empty draft vocabulary: all tokens
        size = draft["draft_vocabulary"] or everything
        key = (draft["draft_exit"], draft["draft_length"], size, draft["draft_stop"])
        return next(
            r for r in table
            if (r["draft_exit"], r["draft_length"], r["draft_vocabulary"], r["draft_stop"]) == key
        )  # fmt: skip

    def described(draft: Mapping, table: Sequence[Mapping]) -> str:
        r = row(table, draft)
        predicted = " / ".join(f"{v:.2f}x" for v in r["predicted_speedup"].values())
        return (f"layer {r['draft_layer']}, length {r['draft_length']}, {r['draft_vocabulary']} tokens, stop "
                f"{r['draft_stop']:g} (predicted {predicted})")  # fmt: skip

    batches = list(served["served_steps"])
    chosen = draft_settings(policy)

    steps, cost = served["served_steps"], served["served_cost"]

    def per_batch(value: Any, spec: str = ".2f") -> str:
        """``value(b)`` at each batch, formatted, joined with slashes."""
        return " / ".join(format(value(b), spec) for b in batches)

    return [
        "## The draft, chosen on the server",
        "",
        f"Served at batch {' / '.join(batches)} (wall time, the least of 3 rounds): a full step "
        f"{per_batch(lambda b: 1e3 * steps[b]['full_s'])} ms against "
        f"{per_batch(lambda b: 1e3 * parts[b]['full'])} ms of its parts (CPU time, one thread); a pass of "
        f"the probe draft {per_batch(lambda b: 1e3 * steps[b]['pass_s'])} ms "
        f"({per_batch(lambda b: steps[b]['drafts'])} drafts). Through both: a step served takes "
        f"{per_batch(lambda b: cost[b]['compute_factor'])} times its parts plus "
        f"{per_batch(lambda b: 1e3 * cost[b]['per_step_s'])} ms. The calibration's choice, from the parts "
        f"alone ({calibrated['version']}): {described(calibrated, policy['provenance']['draft']['table'])}; "
        f"the same served: {described(calibrated, served['table'])}. Chosen served ({policy['version']}): "
        f"{described(chosen, served['table'])}. Predictions at batch {' / '.join(batches)}.",
        "",
    ]


def rotated(items: Sequence[str], shift: int) -> list[str]:
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def run_generation_bench(config: GenerationBenchConfig) -> dict:
    from tokenizers import Tokenizer

    from offramp.backend.environment import prepare_execution_env
    from offramp.build.code_data import completion_tasks, split_modules, stdlib_modules
    from offramp.build.generation_calibrate import draft_for_served_steps, served_probe, token_disagreement
    from offramp.build.generation_repository import write_generator
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
    from offramp.client.tools.bench import machine_record, package_versions

    started = time.time()
    artifacts, directory, policy, settings = prepared_model(config)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    seed = artifacts.build.get("settings", {}).get("split_seed", 0)
    test_modules = split_modules(stdlib_modules(), seed)["test"]
    tasks = completion_tasks(test_modules, tokenizer, artifacts.context - 64, seed=1)
    tasks = [
        tasks[i] for i in sorted(np.random.default_rng(1).choice(len(tasks), config.requests, replace=False))
    ]
    scratch = config.workdir / "generation-bench"
    repository = scratch / "model_repository"
    raw = config.out / "results"
    raw.mkdir(parents=True, exist_ok=True)
    runs, perf = [], []

    def serving(policy: Any) -> EmbeddedTritonServer:
        write_generator(directory, policy, repository, execution_env=prepare_execution_env(), name="coder")
        log = scratch / "tritonserver.log"
        return EmbeddedTritonServer(repository, ports=ServerPorts.free(), log_path=log, startup_timeout_s=600)

    # The draft is chosen again from what serving makes of a step on this server, measured first (module doc).
    calibrated = policy
    probe = served_probe(calibrated, settings, len(artifacts.exit_layers))
    with serving(probe) as server:
        url, metrics = server.grpc_url, server.metrics_url
        run_once(url, "coder", tasks[:4], "next_line", "full", 2, metrics)  # warm-up: the stub's first calls
        served = served_steps(url, "coder", tasks, probe, settings.timing_batches, metrics)
    for batch, steps in served.items():
        print(f"served at batch {batch}: full step {steps.full_s * 1e3:.2f} ms, self_speculative pass "
              f"{steps.pass_s * 1e3:.2f} ms ({steps.drafts:.2f} drafts)")  # fmt: skip
    policy = draft_for_served_steps(directory, calibrated, served, settings)
    with serving(policy) as server:
        url, metrics = server.grpc_url, server.metrics_url
        run_once(url, "coder", tasks[:4], "next_line", "full", 2, metrics)  # warm-up: the stub's first calls
        plan = [
            (w, c, r) for w in config.workloads for c in config.concurrency for r in range(config.repeats)
        ]
        for step, (workload, concurrency, rep) in enumerate(plan):
            for mode in rotated(MODES, rep + step):
                record = run_once(url, "coder", tasks, workload, mode, concurrency, metrics)
                runs.append({**record, "round": rep})
                print(
                    f"{workload:>10} c={concurrency:<3} round {rep} {mode:>16}: "
                    f"{record['tokens_per_s']:7.1f} tokens/s"
                    f"{'  ERRORS ' + str(record['errors']) if record['errors'] else ''}",
                    flush=True,
                )
        if config.perf_analyzer:
            data = prompt_input_data(scratch / "prompts.json", [t.prompt for t in tasks])
            for concurrency in config.concurrency:
                for mode in MODES:
                    perf.append(
                        perf_analyzer_run(url, "coder", data, mode, concurrency, metrics, config, raw)
                    )
                    print(
                        f"perf_analyzer c={concurrency} {mode}: {perf[-1]['tokens_per_s']:.1f} tokens/s",
                        flush=True,
                    )
    reference = None
    if config.reference_prompts and artifacts.family == "llama":
        served_full = (
            next(r["completions"] for r in runs if r["workload"] == "64_tokens" and r["mode"] == "full")
            if "64_tokens" in config.workloads
            else []
        )
        reference = transformers_reference(directory, artifacts, policy, tasks[: config.reference_prompts],
                                           {"full": served_full[: config.reference_prompts]})  # fmt: skip
    summary = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_record(),
        "versions": {**package_versions(), "transformers": importlib.metadata.version("transformers")},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "model": {
            "name": artifacts.name,
            "exit_layers": list(artifacts.exit_layers),
            "fingerprint": artifacts.fingerprint,
            "context": artifacts.context,
        },  # fmt: skip
        "policy": json.loads(json.dumps(asdict(policy))),
        "calibrated_draft": draft_settings(asdict(calibrated)),
        "tasks": [{"module": t.module, "function": t.function, "line": t.line} for t in tasks],
        "runs": runs,
        "perf_analyzer": perf,
        "reference": reference,
    }
    summary["table"] = summarize(runs, token_disagreement)
    (raw / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    report = config.out / "GENERATION.md"
    report.write_text(generation_report(summary))
    print(f"report: {report}")
    return summary


def summarize(runs: Sequence[Mapping], disagreement: Any) -> list[dict]:
    """Per workload and concurrency: each mode's medians over rounds, ratios to ``full`` within a round,
    identity of self_speculative with full, confident's disagreement with full."""
    table = []
    keys = sorted(
        {(r["workload"], r["concurrency"]) for r in runs}, key=lambda k: (list(WORKLOADS).index(k[0]), k[1])
    )
    for workload, concurrency in keys:
        level = [r for r in runs if r["workload"] == workload and r["concurrency"] == concurrency]
        rounds = sorted({r["round"] for r in level})
        by = {(r["round"], r["mode"]): r for r in level}
        row: dict[str, Any] = {"workload": workload, "concurrency": concurrency}
        for mode in MODES:
            mine = [by[(k, mode)] for k in rounds if (k, mode) in by]
            row[mode] = {
                field: _median([m[field] for m in mine]) for field in
                ("tokens_per_s", "ms_per_token_p50", "ms_per_token_p99", "ttft_ms_p50", "ttft_ms_p99",
                 "exact_line_match", "tokens_per_step")
            }  # fmt: skip
            row[mode]["errors"] = sum(m["errors"] for m in mine)
            row[mode]["ratio"] = _median(
                [
                    by[(k, mode)]["tokens_per_s"] / by[(k, "full")]["tokens_per_s"]
                    for k in rounds
                    if (k, mode) in by and (k, "full") in by
                ]
            )
        speculative = [by[(k, "self_speculative")] for k in rounds if (k, "self_speculative") in by]
        drafted = sum(s["drafted"] for s in speculative)
        row["acceptance_rate"] = sum(s["accepted"] for s in speculative) / drafted if drafted else None
        passes = sum(s["verify_passes"] for s in speculative)
        row["drafts_per_verify"] = drafted / passes if passes else None
        pairs = [
            (by[(k, "full")], by[(k, "self_speculative")])
            for k in rounds
            if (k, "full") in by and (k, "self_speculative") in by
        ]
        row["identical"] = sum(
            a == b for f, s in pairs for a, b in zip(f["completions"], s["completions"], strict=True)
        )
        row["compared"] = sum(len(f["completions"]) for f, _ in pairs)
        confident = [
            (by[(k, "full")], by[(k, "confident")])
            for k in rounds
            if (k, "full") in by and (k, "confident") in by
        ]
        losses = [
            disagreement(a, b)
            for f, c in confident
            for a, b in zip(f["completions"], c["completions"], strict=True)
        ]
        row["confident_disagreement"] = float(np.mean(losses)) if losses else None
        exits = [e for _, c in confident for seq in c["exits"] for e in seq[1:]]
        row["confident_exit_shares"] = (np.bincount(exits) / len(exits)).tolist() if exits else []
        table.append(row)
    return table


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None


# --- The report ---------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def confident_phrase(policy: Mapping) -> str:
    """What the policy's ``confident`` does, and on what its certificate stands."""
    provenance = policy["provenance"]
    if provenance.get("method") != "learn_then_test":
        return f"confident max-prob threshold {policy['thresholds'][0]:g} at every early exit (uncalibrated)"
    candidates = provenance["candidates"]
    chosen = candidates[provenance["chosen"]]
    checked = len(policy.get("confident_vocabulary") or ())
    rule = (
        f"confident max-prob threshold {chosen['threshold']:g} at every early exit"
        + (f", each scoring the {checked} most frequent tokens first" if checked else "")
        + f" ({chosen['compute']:.3f} of full's multiply-accumulates per token on the calibration)"
    )
    if chosen["threshold"] > 1.0:  # "never"; tested in order, certified up to the first failure
        tested = candidates[1:]
        failed = next((i for i, c in enumerate(tested) if c["p_value"] > provenance["delta"]), None)
        cheapest = min(tested[:failed], key=lambda c: c["compute"], default=None)
        rule = "confident never leaves early, so it answers as full does: " + (
            f"the cheapest certified threshold ({cheapest['threshold']:g}) costs "
            f"{cheapest['compute']:.3f} of full's multiply-accumulates per token"
            if cheapest
            else "no threshold was certified"
        )
    return (
        f"{rule} (Learn-then-Test, epsilon {provenance['epsilon']:g}, delta {provenance['delta']:g}, token "
        f"disagreement per completion of the task {provenance['task']}: "
        f"{provenance['calibration_risk']:.4f} on {provenance['calibration_completions']} calibration "
        f"completions, {provenance['test_risk']:.4f} on {provenance['test_completions']} test ones; a "
        "workload that does not stop where the task does lies outside the certificate)"
    )


def generation_report(summary: Mapping) -> str:
    from offramp.build.markdown import markdown_table

    policy = summary["policy"]
    lines = [
        "# Code completion: decoding modes side by side",
        "",
        f"Model {summary['model']['name']} (exits after layers {summary['model']['exit_layers']}), policy "
        f"{policy['version']}: draft exit {policy['draft_exit']} (layer "
        f"{summary['model']['exit_layers'][policy['draft_exit']]}), draft length {policy['draft_length']}"
        + (
            f" (drafting ends once every row drafted a token under max-prob {policy['draft_stop']:g})"
            if policy.get("draft_stop")
            else ""
        )
        + ", "
        + confident_phrase(policy)
        + ".",
        "",
        f"{summary['config']['requests']} prompts from the test modules per run, "
        f"{summary['config']['repeats']} "
        f"interleaved rounds per level (medians; ratios to full within a round), one server, one generator "
        f"instance, 1 torch thread; {summary['machine']['nproc']} cores ({summary['machine']['cpu_model']}), "
        "load at "
        f"start {', '.join(summary['machine']['loadavg_at_start'])}; {summary['date']}, "
        f"{summary['duration_s'] / 60:.0f} min.",
        "",
    ]
    lines += draft_choice_lines(summary)
    for workload in WORKLOADS:
        rows = [r for r in summary["table"] if r["workload"] == workload]
        if not rows:
            continue
        lines += [f"## {workload}", ""]
        lines.append(
            markdown_table(
                [
                    "c",
                    "full tok/s",
                    "self_spec tok/s",
                    "x full",
                    "confident tok/s",
                    "x full",
                    "ms/token p50/p99 full",
                    "self_spec",
                    "confident",
                    "TTFT p50 ms (full)",
                    "acceptance",
                    "drafts/verify",
                    "tokens/verify",
                    "exact line full / self_spec / confident",
                    "self_spec = full",
                    "confident disagreement",
                ],
                [
                    [
                        r["concurrency"],
                        _f(r["full"]["tokens_per_s"]),
                        _f(r["self_speculative"]["tokens_per_s"]),
                        _f(r["self_speculative"]["ratio"], 2, "x"),
                        _f(r["confident"]["tokens_per_s"]),
                        _f(r["confident"]["ratio"], 2, "x"),
                        *(f"{_f(r[m]['ms_per_token_p50'])} / {_f(r[m]['ms_per_token_p99'])}" for m in MODES),
                        _f(r["full"]["ttft_ms_p50"], 0),
                        _f(r["acceptance_rate"], 3),
                        _f(r.get("drafts_per_verify"), 2),  # absent from runs before the draft stop
                        _f(r["self_speculative"]["tokens_per_step"], 2),
                        " / ".join(_f(100 * r[m]["exact_line_match"], 1, "%") for m in MODES),
                        f"{r['identical']}/{r['compared']}",
                        _f(r["confident_disagreement"], 4),
                    ]
                    for r in rows
                ],
            )
        )
        lines.append("")
    if summary["perf_analyzer"]:
        lines += ["## perf_analyzer --streaming (64 tokens per request)", ""]
        levels = sorted({p["concurrency"] for p in summary["perf_analyzer"]})
        by = {(p["mode"], p["concurrency"]): p for p in summary["perf_analyzer"]}
        lines.append(
            markdown_table(
                ["c", *(f"{m} tok/s" for m in MODES), "self_spec x", "confident x"],
                [
                    [
                        c,
                        *(_f(by[(m, c)]["tokens_per_s"]) for m in MODES),
                        _f(
                            by[("self_speculative", c)]["tokens_per_s"] / by[("full", c)]["tokens_per_s"],
                            2,
                            "x",
                        ),
                        _f(by[("confident", c)]["tokens_per_s"] / by[("full", c)]["tokens_per_s"], 2, "x"),
                    ]
                    for c in levels
                ],
            )
        )
        lines.append("")
    reference = summary.get("reference")
    if reference:
        lines += [
            "## The outside reference: transformers at batch 1",
            "",
            f"transformers {summary['versions'].get('transformers', '')} `generate`, greedy, 64 new tokens, "
            f"{reference['prompts']} prompts, 1 thread: plain {reference['plain']['tokens_per_s']:.1f} "
            "tokens/s, "
            f"`assistant_early_exit={reference['draft_layer']}` (draft length {reference['draft_length']}) "
            f"{reference['assistant_early_exit']['tokens_per_s']:.1f} tokens/s: "
            f"**{reference['speedup']:.2f}x**; "
            f"same tokens as plain: {reference['early_exit_same_as_plain']}; plain equals the served full "
            f"mode on {reference['plain_same_as_served_full']['equal']}/"
            f"{reference['plain_same_as_served_full']['compared']} prompts.",
            "",
        ]
    lines += ["## Goals", ""]
    table = {(r["workload"], r["concurrency"]): r for r in summary["table"]}
    goal_rows = []
    for (mode, concurrency), goal in GOALS.items():
        for workload in WORKLOADS:
            r = table.get((workload, concurrency))
            if r is not None and r[mode]["ratio"] is not None:
                met = "met" if r[mode]["ratio"] >= goal else "not met"
                goal_rows.append(
                    [f"{mode} at c={concurrency}", workload, f"{goal:g}x", f"{r[mode]['ratio']:.2f}x", met]
                )
    lines.append(markdown_table(["goal", "workload", "target", "measured", ""], goal_rows))
    return "\n".join(lines) + "\n"


def main_generation_bench(config: GenerationBenchConfig) -> int:
    from offramp.client.tools.bench import measurement_status

    return measurement_status("offramp generate bench", lambda: run_generation_bench(config))
