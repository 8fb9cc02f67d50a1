"""The one Markdown table helper, and the text-model report that writes its tables with it."""

from __future__ import annotations

from types import SimpleNamespace

from offramp.build.markdown import markdown_table
from offramp.build.text_recipes import results_markdown


def test_a_table_writes_cells_with_str_and_an_empty_cell_as_one_space():
    assert markdown_table(["task", "exit 1", "probe"], [["trec", 0.5, ""], ["rt", 1, "-"]]) == (
        "| task | exit 1 | probe |\n|---|---|---|\n| trec | 0.5 | |\n| rt | 1 | - |"
    )


def _text_build(refit: bool, probe: list[float]) -> SimpleNamespace:
    """What ``results_markdown`` reads of a text build's artifacts."""
    build = {
        "probe_baseline_accuracy": probe[-1] if probe else None,
        "probe_test_accuracy": probe,
        "joint_exit_test_accuracy": [0.5, 0.61, 0.723],
        "head_refit": {"refit_exits": [0], "calibration_accuracy_joint": [0.5, 0.6, 0.7],
                       "calibration_accuracy_refit": [0.55, 0.6, 0.7]} if refit else None,
        "split_sizes": {"train": 100, "calibration": 20, "test": 30},
        "settings": {"epochs": 2, "seed": 0, "fractions": [0.7, 0.15, 0.15], "batch_size": 32,
                     "learning_rate": 5e-5, "weight_decay": 0.01, "max_length": 64},
        "train_rows": 90, "timings": {"train_seconds": 12.3, "test_seconds": 1.0},
        "cost_sequence_length": 11, "torch": "2.13.0", "torch_threads": 1, "transformers": "5.24.0",
    }  # fmt: skip
    return SimpleNamespace(
        num_exits=3, build=build, exit_test_accuracy=(0.52, 0.63, 0.745), exit_costs=(0.3, 0.6, 1.0)
    )


def test_the_text_report_tables_read_as_before():
    built = {"trec": _text_build(True, [0.4, 0.5, 0.6]), "rotten_tomatoes": _text_build(False, [])}
    report = results_markdown(built)
    accuracy = (
        "| task | exit 1 | exit 2 | exit 3 | frozen probe, last layer |\n"
        "|---|---|---|---|---|\n"
        "| trec | 52.0 | 63.0 | 74.5 | 60.0 |\n"
        "| trec, joint heads before refit | 50.0 | 61.0 | 72.3 | |\n"
        "| rotten_tomatoes | 52.0 | 63.0 | 74.5 | - |\n"
        "\n"
        "Accuracy in percent"
    )
    data = (
        "\n\n| task | train rows used / split | calibration | test | epochs | seed | train s | probe s "
        "| refit s | test s | export s | exit cost fractions |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| trec | 90 / 100 | 20 | 30 | 2 | 0 | 12.3 | - | - | 1.0 | - | 0.30 0.60 1.00 |\n"
        "| rotten_tomatoes | 90 / 100 | 20 | 30 | 2 | 0 | 12.3 | - | - | 1.0 | - | 0.30 0.60 1.00 |\n"
        "\nSettings: "
    )
    assert accuracy in report and data in report
