"""`offramp calibrate` on a real (briefly trained) model: policy, guarantee figures, report, determinism."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from offramp.backend.policy import Policy
from offramp.build.calibrate import (
    CalibrationData,
    calibrate_artifacts,
    exit_logits_from_onnx,
    simulate_exits,
)
from offramp.build.risk_control import fit_split
from offramp.client.cli.main import main


@pytest.fixture(scope="module")
def calibration_npz(quick_cnn, fashion_test, tmp_path_factory):
    """2,000 test images as a calibration file with two cohorts, one of them tiny."""
    images, labels = fashion_test
    cohorts = np.where(np.arange(2000) < 3, "tiny", "main")
    path = tmp_path_factory.mktemp("calibration") / "data.npz"
    np.savez(path, IMAGE=images[:2000], labels=labels[:2000], cohorts=cohorts)
    return path


def test_calibrate_writes_a_servable_policy_and_a_report(quick_cnn, calibration_npz, tmp_path, capsys):
    artifacts, directory = quick_cnn
    out = tmp_path / "policy.json"
    args = [
        "calibrate",
        "--artifacts",
        str(directory),
        "--data",
        str(calibration_npz),
        "--out",
        str(out),
        "--epsilon",
        "0.05",
        "--delta",
        "0.1",
        "--report",
        str(tmp_path / "report"),
    ]
    with pytest.warns(UserWarning, match="tiny"):
        assert main(args) == 0
    policy = Policy.load(out).validate(artifacts.num_exits, artifacts.num_classes, artifacts.fingerprint)
    assert policy.provenance["epsilon"] == 0.05 and policy.provenance["delta"] == 0.1
    assert policy.provenance["achieved_risk"] <= 0.05
    assert "tiny" not in policy.cohorts  # three rows certify nothing: the global thresholds serve them
    assert abs(sum(policy.exit_rate_profile) - 1.0) < 1e-9
    for name in ["report.md", "pareto.png", "reliability.png", "exit_rates.png"]:
        assert (tmp_path / "report" / name).stat().st_size > 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Per cohort" in report

    # The report's figures are the console's, on the same rows: the 1,500 certifying rows of 2,000.
    console = capsys.readouterr().out
    risk, compute = re.search(
        r"achieved calibration risk ([0-9.]+), expected compute ([0-9.]+)", console
    ).groups()
    rates = re.search(r"exit-rate profile: (.+)", console).group(1).split(", ")
    assert "**1500 certifying rows**" in report and policy.provenance["fit_rows"] == 500
    exit_rates = ", ".join(f"exit {k}: {rate}" for k, rate in enumerate(rates))
    assert f"calibration risk {risk}; expected compute {compute}" in report
    assert f"exit-rate profile: {exit_rates}" in report
    agreement = 1 - policy.provenance["achieved_risk"]  # the risk is disagreement
    assert f"agreement with the full model {agreement:.2%}" in report
    assert "1500 certifying rows by their true class" in report
    assert sum(int(cells[1]) for cells in table_rows(report, "## Per true class")) == 1500
    cohorts = {cells[0]: cells for cells in table_rows(report, "## Per cohort")}
    main_cohort = policy.provenance["cohorts"]["main"]
    assert cohorts["main"][2] == "own" and int(cohorts["main"][1]) == main_cohort["calibration_rows"]
    assert cohorts["main"][-1] == f"{main_cohort['expected_cost']:.3f}"  # under its own thresholds
    assert cohorts["tiny"][2] == "global (fell back)"

    # The same command gives the same policy, version included.
    again = tmp_path / "again.json"
    with pytest.warns(UserWarning):
        main([str(again) if a == str(out) else a for a in args[:-2]])
    assert json.loads(again.read_text()) == json.loads(out.read_text())


def test_calibrate_ladder_writes_the_rungs_into_the_policy(quick_cnn, calibration_npz, tmp_path, capsys):
    """`--ladder` certifies each higher level as a rung of the same policy, delta split across the rungs;
    a ladder is content, so the policy's version differs from the one without it."""
    artifacts, directory = quick_cnn
    common = [
        "calibrate",
        "--artifacts",
        str(directory),
        "--data",
        str(calibration_npz),
        "--epsilon",
        "0.02",
        "--delta",
        "0.1",
        "--quiet",
    ]
    with pytest.warns(UserWarning, match="tiny"):
        assert main([*common, "--out", str(tmp_path / "ladder.json"), "--ladder", "0.05", "0.1"]) == 0
        assert main([*common, "--out", str(tmp_path / "plain.json")]) == 0
    ladder = Policy.load(tmp_path / "ladder.json").validate(artifacts.num_exits, artifacts.num_classes)
    plain = Policy.load(tmp_path / "plain.json")
    assert [rung.epsilon for rung in ladder.rungs] == [0.05, 0.1] and plain.rungs == ()
    assert ladder.version != plain.version
    # Rung 0 is certified at delta / 3 (each rung's share), so it may only be more careful than plain.
    assert ladder.provenance["expected_cost"] >= plain.provenance["expected_cost"]
    # A higher risk level never needs more compute: each rung's set of candidates includes the lower's.
    costs = [ladder.provenance["expected_cost"], *(rung.expected_cost for rung in ladder.rungs)]
    assert costs == sorted(costs, reverse=True)
    assert "rung 1: epsilon 0.05" in capsys.readouterr().out


def test_calibrate_certifies_an_accuracy_bound_with_the_risk(quick_cnn, calibration_npz, tmp_path, capsys):
    """`--max-accuracy-loss` adds a bound tested with the risk on the same rows: the policy states both,
    records the calibration's accuracy loss under it, and may only be more careful than the risk alone."""
    artifacts, directory = quick_cnn
    common = ["calibrate", "--artifacts", str(directory), "--data", str(calibration_npz), "--epsilon", "0.05"]
    common += ["--quiet"]
    with pytest.warns(UserWarning, match="tiny"):
        assert main([*common, "--out", str(tmp_path / "joint.json"), "--max-accuracy-loss", "0.01"]) == 0
        assert main([*common, "--out", str(tmp_path / "plain.json")]) == 0
    joint = Policy.load(tmp_path / "joint.json").validate(artifacts.num_exits, artifacts.num_classes)
    plain = Policy.load(tmp_path / "plain.json").provenance
    assert joint.provenance["max_accuracy_loss"] == 0.01 and plain["max_accuracy_loss"] is None
    assert 0 <= joint.provenance["achieved_accuracy_loss"] <= 0.01
    assert "achieved_accuracy_loss" not in plain
    assert joint.provenance["expected_cost"] >= plain["expected_cost"]
    # What `offramp policy list` and the bench report say each policy holds.
    assert joint.certified_bounds == "disagreement <= 0.05 and accuracy loss <= 1 points"
    assert Policy.load(tmp_path / "plain.json").certified_bounds == "disagreement <= 0.05"
    assert Policy.fixed("fp", artifacts.num_exits).certified_bounds == "no certified bound"
    printed = capsys.readouterr().out
    assert "accuracy lost against the full model is <= 0.01" in printed
    assert "achieved calibration accuracy loss" in printed
    # A bound that is no fraction is refused on one line before any row is run.
    assert main([*common, "--max-accuracy-loss", "1.5"]) == 2
    assert "max_accuracy_loss must lie in [0, 1), not 1.5" in capsys.readouterr().err


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, as lists of stripped cells."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_epsilon_zero_gives_no_early_exits(quick_cnn, fashion_test):
    artifacts, directory = quick_cnn
    images, labels = fashion_test
    data = CalibrationData({"IMAGE": images[:1000]}, labels[:1000])
    policy, _, logits = calibrate_artifacts(artifacts, directory, data, epsilon=0.0, delta=0.05)
    assert (simulate_exits(logits, policy.exits) == artifacts.num_exits - 1).all()


def test_a_wrong_calibration_file_names_what_it_lacks(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pixels=np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"missing arrays \['IMAGE', 'labels'\]"):
        CalibrationData.from_npz(path, ["IMAGE"])


def test_calibrate_from_the_rows_shadow_checks_kept(quick_cnn, fashion_test, tmp_path, capsys):
    """Rows kept by a served policy's store (two processes' chunks, one cohort) certify a new policy at
    the same guarantee, with the full network's answers as what early answers must agree with."""
    from offramp.backend.segment_runner import OnnxRunner
    from offramp.backend.shadow_store import ShadowStore

    artifacts, directory = quick_cnn
    images = fashion_test[0][:2000]
    full = OnnxRunner(directory / artifacts.full_onnx).run({"IMAGE": images})["LOGITS"].argmax(axis=1)
    for instance, part in (("m-0", slice(0, 1200)), ("m-1", slice(1200, 2000))):
        store = ShadowStore(tmp_path / "kept", instance)
        rows = len(images[part])
        store.add(
            {"IMAGE": images[part]},
            exit=np.zeros(rows, np.int64),
            label=full[part],
            full_label=full[part],
            cohort=np.full(rows, ""),
            request_id=np.full(rows, "r"),
            row=np.arange(rows),
            time=np.full(rows, 1e9),
        )
        store.flush()
    out = tmp_path / "policy.json"
    args = [
        "calibrate",
        "--artifacts",
        str(directory),
        "--shadow",
        str(tmp_path / "kept"),
        "--out",
        str(out),
        "--epsilon",
        "0.05",
        "--quiet",
    ]
    assert main(args) == 0
    policy = Policy.load(out).validate(artifacts.num_exits, artifacts.num_classes, artifacts.fingerprint)
    assert policy.provenance["epsilon"] == 0.05 and policy.provenance["risk"] == "disagreement"
    assert policy.provenance["calibration_rows"] + policy.provenance["fit_rows"] == 2000
    # The same rows given as a data file certify the same policy: the store loses nothing on the way.
    np.savez(tmp_path / "same.npz", IMAGE=images, labels=full)
    same = tmp_path / "same.json"
    assert main([*args[:3], "--data", str(tmp_path / "same.npz"), "--out", str(same), *args[7:]]) == 0
    assert Policy.load(same).exits == policy.exits
    assert main([*args, "--data", str(tmp_path / "same.npz")]) == 2
    assert "not true labels" in capsys.readouterr().err
    assert main([*args, "--max-accuracy-loss", "0.01"]) == 2  # an accuracy bound needs true labels
    assert "no --max-accuracy-loss" in capsys.readouterr().err


def test_calibrate_rule_all_keeps_the_family_with_the_least_certified_compute(
    quick_cnn, calibration_npz, tmp_path, capsys
):
    artifacts, directory = quick_cnn
    common = ["calibrate", "--artifacts", str(directory), "--data", str(calibration_npz), "--quiet"]
    policies = {}
    for rule in ("patience", "all"):
        out = tmp_path / f"{rule}.json"
        with pytest.warns(UserWarning, match="tiny"):
            assert main([*common, "--rule", rule, "--out", str(out)]) == 0
        policies[rule] = Policy.load(out).validate(
            artifacts.num_exits, artifacts.num_classes, artifacts.fingerprint
        )
    console = capsys.readouterr().out

    patience = policies["patience"]
    assert patience.rule == "patience" and patience.provenance["rule"] == "patience"
    assert all(r.patience >= 2 for r in patience.exits)

    chosen = policies["all"]
    tried = chosen.provenance["rules_tried"]
    assert set(tried) == {"confidence", "patience", "score", "novelty"}
    assert chosen.rule == min(tried, key=tried.get) and chosen.provenance["rule"] == chosen.rule
    assert chosen.provenance["expected_cost"] == min(tried.values())
    assert chosen.provenance["delta"] == 0.05 / 4  # the level each family was tested at
    assert "with probability >= 0.95 over the calibration rows" in chosen.provenance["guarantee"]
    assert "certified compute per rule: confidence" in console and f"rule: {chosen.rule}" in console
    # The served rules take, on the certifying rows, the exits the calibration counted.
    data = np.load(calibration_npz)
    logits = exit_logits_from_onnx(artifacts, directory, {"IMAGE": data["IMAGE"]})
    _, certify = fit_split(2000, 0.25, seed=0)
    taken = simulate_exits(logits[:, certify], chosen.exits)
    rates = np.bincount(taken, minlength=artifacts.num_exits) / len(certify)
    np.testing.assert_allclose(rates, chosen.provenance["exit_rate_profile"])


def test_calibrate_refuses_a_confidence_metric_for_another_rule(quick_cnn, calibration_npz, capsys):
    _, directory = quick_cnn
    args = ["calibrate", "--artifacts", str(directory), "--rule", "patience", "--metric", "entropy"]
    assert main(args) == 2
    assert "the patience rule has its own" in capsys.readouterr().err
