"""The live-guarantee tool's in-process measurements: the exit figures it reports, the foreign domains it
makes, and the novelty command end to end on a briefly trained CNN."""

from __future__ import annotations

import json

import numpy as np

from offramp.backend.policy import ExitRule
from offramp.build.foreign_images import shuffle_pixels
from offramp.client.tools.live_guarantee import exit_figures, main


def test_exit_figures_count_exits_compute_and_agreement() -> None:
    # 4 rows, 2 exits of 3 classes: rows 0 and 1 are sure at exit 0 (row 1 changes its mind later).
    first = np.array([[9, 0, 0], [0, 9, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    last = np.array([[9, 0, 0], [9, 0, 0], [0, 9, 0], [0, 0, 9]], dtype=np.float32)
    rules = (ExitRule("max_prob", 0.9), ExitRule("max_prob", 2.0))
    figures = exit_figures(np.stack([first, last]), rules, (0.4, 1.0), np.array([0, 0, 1, 0]))
    assert figures == {
        "rows": 4,
        "exit_profile": [0.5, 0.5],
        "compute": 0.7,
        "agreement": 0.75,
        "accuracy": 0.5,
    }


def test_shuffled_pixels_keep_each_image_s_values_and_move_them_alike() -> None:
    images = np.random.default_rng(0).random((5, 1, 4, 4)).astype(np.float32)
    shuffled = shuffle_pixels(images)
    assert shuffled.shape == images.shape and shuffled.dtype == np.float32
    np.testing.assert_array_equal(np.sort(shuffled.reshape(5, -1)), np.sort(images.reshape(5, -1)))
    assert not np.array_equal(shuffled, images)
    # One permutation for all: where image 0's pixel went, image 1's went too.
    order = [int(np.flatnonzero(images[0].ravel() == v)[0]) for v in shuffled[0].ravel()]
    np.testing.assert_array_equal(shuffled[1].ravel(), images[1].ravel()[order])


def test_the_novelty_command_certifies_both_rules_on_the_same_rows_and_judges_them(tmp_path) -> None:
    code = main(
        ["novelty", "--quick", "--workdir", str(tmp_path / "work"), "--foreign-rows", "300",
         "--epsilon", "0.05", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "out" / "novelty.json").read_text())
    confidence, gated = result["rules"]["confidence"], result["rules"]["novelty"]
    assert confidence["certifying_rows"] == gated["certifying_rows"] > 0
    assert confidence["fit_rows"] == gated["fit_rows"] > 0
    for rule in (confidence, gated):
        assert set(rule["domains"]) == {"in-domain", "digits", "photo", "shuffled"}
        for name, figures in rule["domains"].items():
            assert figures["rows"] == (10_000 if name == "in-domain" else 300)
            assert abs(sum(figures["exit_profile"]) - 1.0) < 1e-3
            assert 0.0 < figures["compute"] <= result["exit_costs"][-1] + 1e-3  # the last exit's cost
    assert all(limit is not None for limit in gated["distance_limits"])
    goal = result["goal"]
    first = goal["novelty_first_exit_share"]
    assert goal["foreign_no_earlier"] == {
        d: first[d] <= first["in-domain"] for d in ("digits", "photo", "shuffled")
    }
    ratio = gated["certified_compute"] / confidence["certified_compute"]
    assert abs(goal["certified_compute_ratio"] - ratio) < 1e-3
