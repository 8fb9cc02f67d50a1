"""The measured text builds: a team's fine-tuned MiniLM classifier brought to offramp in attach mode,
beside the base MiniLM trained jointly with its exits, on the same TREC rows; each calibrated and
served. Writes ``benchmarks/text_modes.md`` (and the figures as JSON)::

    .venv/bin/python -m offramp.build.text_modes

1. The team's data: TREC's questions (6 coarse classes) split as the TREC recipe splits them (70/15/15,
   stratified, seed 0), written as ``train.csv``, ``calibration.csv`` and ``test.csv``.
2. The team's classifier: all-MiniLM-L6-v2 fine-tuned on ``train.csv`` as a
   ``BertForSequenceClassification`` (its [CLS] pooler and a linear layer), with transformers and a
   plain torch loop, saved with ``save_pretrained``: what a team would bring.
3. ``attach``: ``offramp build --model <that folder> --train train.csv --calibration calibration.csv
   --test test.csv``; ``joint``: ``offramp build --config examples/trec.toml`` (the base encoder and
   the same rows).
4. Each calibrated by Learn-then-Test (disagreement with the full model at most 1% with probability
   at least 95%) on its calibration rows, served by the embedded tritonserver, and sent the test rows
   as raw text through gRPC; ``<name>_full`` through the same server.

Every stage is reused when its inputs did not change (the fine-tuned folder by key, the builds by key).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from offramp.build.artifacts import ModelArtifacts
from offramp.build.build_cache import build_key, staged_build
from offramp.build.calibrate import calibrate_artifacts, held_out_data, text_inputs
from offramp.build.markdown import markdown_table
from offramp.build.model_build import build_model
from offramp.build.tabular import write_columns
from offramp.build.text_data import TextDataset, TextSource
from offramp.build.text_recipes import text_splits_of, torch_threads
from offramp.build.train import seed_everything
from offramp.build.transformer import minilm_path

RESULTS = Path("benchmarks/text_modes")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trec.toml"
FINE_TUNE_KEY = "offramp_fine_tune.json"  # beside the saved classifier: what made it


@dataclass(frozen=True)
class TextModesExperiment:
    fine_tune_epochs: int = 3
    fine_tune_learning_rate: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    epsilon: float = 0.01
    delta: float = 0.05
    rows_per_request: int = 16
    concurrency: int = 4


def write_split_files(source_build: ModelArtifacts, out: Path) -> dict[str, Path]:
    """The recipe's train, calibration and test rows as CSV files with ``text`` and ``label`` columns."""
    splits = text_splits_of(source_build)
    files = {}
    for part in ("train", "calibration", "test"):
        rows: TextDataset = getattr(splits, part)
        labels = [rows.class_names[i] for i in rows.labels]
        files[part] = write_columns(out / f"{part}.csv", {"text": rows.texts, "label": labels})
    return files


def fine_tune_classifier(train_csv: Path, out: Path, experiment: TextModesExperiment) -> Path:
    """MiniLM fine-tuned as a sequence classifier on ``train_csv`` (plain transformers and torch: the
    team's own model), saved with ``save_pretrained`` into ``out``; reused when made with the same key."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    rows = TextSource(train=train_csv).splits((1.0, 0.0, 0.0), seed=experiment.seed).train
    key = build_key(data=TextSource(train=train_csv).record(), base=str(minilm_path()), **asdict(experiment))
    if (out / FINE_TUNE_KEY).exists() and json.loads((out / FINE_TUNE_KEY).read_text())["key"] == key:
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    batch = tokenizer(
        rows.texts, padding=True, truncation=True, max_length=experiment.max_length, return_tensors="pt"
    )
    labels = torch.from_numpy(rows.labels)
    seed_everything(experiment.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=len(rows.class_names), id2label=dict(enumerate(rows.class_names)),
        label2id={name: i for i, name in enumerate(rows.class_names)},
    )  # fmt: skip
    steps = experiment.fine_tune_epochs * -(-len(labels) // experiment.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=experiment.fine_tune_learning_rate, weight_decay=0.01
    )
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    generator = torch.Generator().manual_seed(experiment.seed)
    started = time.perf_counter()
    model.train()
    for epoch in range(experiment.fine_tune_epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(labels), experiment.batch_size):
            index = order[start : start + experiment.batch_size]
            longest = int(batch["attention_mask"][index].sum(dim=1).max())
            output = model(
                input_ids=batch["input_ids"][index, :longest],
                attention_mask=batch["attention_mask"][index, :longest],
                labels=labels[index],
            )
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
            schedule.step()
            total += output.loss.item()
        print(
            f"fine-tune epoch {epoch + 1}: loss {total / -(-len(labels) // experiment.batch_size):.3f}",
            file=sys.stderr,
        )
    with staged_build(out) as work:
        model.eval().save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        seconds = round(time.perf_counter() - started, 1)
        (work / FINE_TUNE_KEY).write_text(json.dumps({"key": key, "train_seconds": seconds}) + "\n")
    return out


def built(argv: list[str]) -> tuple[ModelArtifacts, Path]:
    """What ``offramp build ARGV`` builds, and where (the command line's own parsing)."""
    from offramp.client.cli.build import config_of
    from offramp.client.cli.main import parser

    config = config_of(parser().parse_args(["build", *argv]))
    return build_model(config), config.out


def served_figures(
    builds: dict[str, tuple[ModelArtifacts, Path]],
    policies: dict,
    workdir: Path,
    experiment: TextModesExperiment,
) -> dict[str, dict]:
    """Each build's test rows through one server: the early-exit service (raw text) and ``<name>_full``."""
    from offramp.backend.environment import prepare_execution_env
    from offramp.build.repository import RepositoryOptions, full_model_name, write_repository
    from offramp.client.grpc_client import Predictions
    from offramp.client.serving.server import EmbeddedTritonServer, ServerPorts
    from offramp.client.tools.demo import send_all

    repository = workdir / "repository"
    options = RepositoryOptions(execution_env=prepare_execution_env())
    for mode, (artifacts, directory) in builds.items():
        write_repository(artifacts, directory, policies[mode], repository, options)
    figures = {}
    with EmbeddedTritonServer(
        repository, ports=ServerPorts.free(), log_path=workdir / "server.log"
    ) as server:
        for mode, (artifacts, directory) in builds.items():
            test = text_splits_of(artifacts).test
            labels, rows = test.labels, len(test.labels)
            name = artifacts.name
            send = lambda call, desc: send_all(  # noqa: E731
                server.grpc_url, rows, experiment.rows_per_request, experiment.concurrency, call, desc
            )
            early_parts, early_run = send(lambda c, s: c.classify_text(name, test.texts[s]), name)
            full_parts, full_run = send(
                lambda c, s: c.full_logits(
                    full_model_name(name), text_inputs(artifacts, directory, test.texts[s])
                ),
                full_model_name(name),
            )
            early = Predictions.concatenate(early_parts)
            full = np.concatenate(full_parts).argmax(axis=1)
            figures[mode] = {
                "rows": rows,
                "early_accuracy": float((early.label == labels).mean()),
                "full_accuracy": float((full == labels).mean()),
                "agreement": float((early.label == full).mean()),
                "mean_cost": float(early.cost.mean()),
                "exit_rates": (np.bincount(early.exit, minlength=artifacts.num_exits) / rows).tolist(),
                "label_names_match": bool(
                    (early.label_name == np.array(artifacts.class_names)[early.label]).all()
                ),
                "early_rows_per_second": early_run.rows_per_second,
                "full_rows_per_second": full_run.rows_per_second,
            }
    return figures


def run(workdir: Path, experiment: TextModesExperiment = TextModesExperiment()) -> dict:
    """Both builds, calibrated and served; the figures of the table."""
    joint = built(["--config", str(EXAMPLE), "--out", str(workdir / "trec_minilm")])
    files = write_split_files(joint[0], workdir / "data")
    team_model = fine_tune_classifier(files["train"], workdir / "trec_minilm_finetuned", experiment)
    attach = built([
        "--model", str(team_model), "--train", str(files["train"]), "--calibration",
        str(files["calibration"]), "--test", str(files["test"]), "--name", "trec_attach",
        "--out", str(workdir / "trec_attach"), "--max-length", str(experiment.max_length),
    ])  # fmt: skip
    builds = {"attach": attach, "joint": joint}
    policies, calibration = {}, {}
    for mode, (artifacts, directory) in builds.items():
        policy, calibrated, _ = calibrate_artifacts(
            artifacts, directory, held_out_data(artifacts, directory), epsilon=experiment.epsilon,
            delta=experiment.delta,
        )  # fmt: skip
        policies[mode] = policy
        calibration[mode] = {
            "rows": calibrated.calibration_rows,
            "achieved_disagreement": policy.provenance["achieved_risk"],
            "certified_compute": policy.provenance["expected_cost"],
        }
    served = served_figures(builds, policies, workdir, experiment)
    fine_tune = json.loads((team_model / FINE_TUNE_KEY).read_text())
    return {
        "experiment": asdict(experiment),
        "rows": joint[0].build["split_sizes"],
        "fine_tune_seconds": fine_tune["train_seconds"],
        "builds": {
            mode: {
                "name": artifacts.name,
                "exit_costs": list(artifacts.exit_costs),
                "exit_test_accuracy": list(artifacts.exit_test_accuracy),
                "exit_test_agreement": artifacts.build["exit_test_agreement"],
                "timings": artifacts.build["timings"],
                "calibration": calibration[mode],
                "served": served[mode],
            }
            for mode, (artifacts, _) in builds.items()
        },
    }


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def results_markdown(results: dict, command: str) -> str:
    experiment, builds, rows = results["experiment"], results["builds"], results["rows"]
    exits = len(next(iter(builds.values()))["exit_costs"])
    per_exit = []
    for mode, build in builds.items():
        per_exit.append([f"{mode}: accuracy", *map(_percent, build["exit_test_accuracy"])])
        per_exit.append(
            [f"{mode}: agreement with the final head", *map(_percent, build["exit_test_agreement"])]
        )
        per_exit.append([f"{mode}: compute fraction", *(f"{c:.2f}" for c in build["exit_costs"])])
    served = [
        [
            mode,
            f"{b['calibration']['certified_compute']:.3f}",
            f"{_percent(b['calibration']['achieved_disagreement'])}",
            f"{_percent(b['served']['early_accuracy'])} / {_percent(b['served']['full_accuracy'])}",
            _percent(b["served"]["agreement"]),
            f"{b['served']['mean_cost']:.3f}",
            " / ".join(_percent(r) for r in b["served"]["exit_rates"]),
        ]
        for mode, b in builds.items()
    ]
    e = experiment
    attach_seconds = builds["attach"]["timings"]
    return "\n".join([
        "# A fine-tuned MiniLM in attach mode and the base MiniLM in joint mode (TREC)",
        "",
        f"Written by `{command}` (`offramp.build.text_modes`). Data: TREC's questions in 6 coarse classes, "
        f"split as the TREC recipe splits them: {rows['train']:,} training, {rows['calibration']:,} "
        f"calibration and {rows['test']:,} test rows (stratified, seed {e['seed']}), as CSV files.",
        "",
        f"`attach`: all-MiniLM-L6-v2 fine-tuned as a `BertForSequenceClassification` (the team's model: "
        f"{e['fine_tune_epochs']} epochs, AdamW at {e['fine_tune_learning_rate']}, batch {e['batch_size']}, "
        f"{results['fine_tune_seconds']:.0f} s here), then `offramp build --model` on it: backbone and head "
        f"frozen, a linear mean-pooling exit head after each of its first 5 layers distilled towards its "
        "head "
        f"(features {attach_seconds['features_seconds']:.0f} s, heads "
        f"{attach_seconds['heads_seconds']:.0f} s). "
        "`joint`: `examples/trec.toml`, the base encoder and its 6 heads fine-tuned together (the recipe).",
        "",
        "## Per exit, on the test split (PyTorch, before serving)",
        "",
        markdown_table(["", *(f"exit {k + 1}" for k in range(exits))], per_exit),
        "",
        f"## Calibrated (Learn-then-Test, disagreement <= {_percent(e['epsilon'])}% w.p. >= "
        f"{_percent(1 - e['delta'])}%) and served",
        "",
        "Certified compute: the mean compute fraction of the certifying calibration rows under the chosen "
        "thresholds. Served: the test rows sent as raw text through gRPC to the embedded tritonserver "
        f"({e['rows_per_request']} rows per request, concurrency {e['concurrency']}); `<name>_full` through "
        "the same server.",
        "",
        markdown_table(
            ["build", "certified compute", "calibration disagreement %", "accuracy early / full (served)",
             "agreement (served)", "mean compute (served)", "exit rates % (served)"],
            served,
        ),  # fmt: skip
        "",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cache/offramp/text_modes"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="writes RESULTS.md and RESULTS.json")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "offramp.build.text_modes", *given])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with torch_threads(args.threads):
        results = run(args.workdir)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    report = results_markdown(results, command)
    args.results.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
