"""A new user's path, through the command line only: their text classifier and their image classifier,
each from files to a calibrated, served model (offramp build, calibrate, repository, a real
tritonserver, infer), with label names in the report, the responses and the printed answers."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from offramp.backend.image import encode_png
from offramp.backend.policy import Policy
from offramp.build.artifacts import ModelArtifacts
from offramp.build.resnet import resnet
from offramp.build.tabular import write_columns
from offramp.client.cli.main import main
from tests.tiny_text import CLASSES, corpus, tiny_classifier_folder
from tests.torchvision_reference import seeded_state_dict

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def offramp(argv: list[str]) -> tuple[int, str, str]:
    """``offramp ARGV``: its exit status, standard output and standard error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def run(argv: list[str]) -> str:
    """``offramp ARGV`` must succeed; its standard output."""
    status, out, err = offramp(argv)
    assert status == 0, err[-2000:]
    return out


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, fashion_test) -> dict[str, Path]:
    """What the two teams bring: a fine-tuned text classifier with CSV and JSON Lines rows, and a
    ResNet-18's state_dict with PNG images in class folders."""
    root = tmp_path_factory.mktemp("user")
    texts, labels = corpus(300)
    test_texts, test_labels = corpus(60, seed=9)
    files = {
        "text_model": tiny_classifier_folder(root / "topic-bert", "bert"),
        "text_train": write_columns(root / "train.csv", {"sentence": texts, "topic": labels}),
        "text_test": write_columns(root / "test.jsonl", {"sentence": test_texts, "topic": test_labels}),
    }
    images, image_labels = fashion_test
    for part, rows in (("train", range(0, 240)), ("test", range(240, 300))):
        for row in rows:
            folder = root / "images" / part / FASHION[image_labels[row]]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{row:04d}.png").write_bytes(encode_png(np.rint(images[row] * 255).astype(np.uint8)))
    team = resnet("resnet18", num_classes=10, width=8)  # trained elsewhere: here, seeded weights
    torch.save(seeded_state_dict(team, seed=3), root / "resnet18.pt")
    files.update(images=root / "images", weights=root / "resnet18.pt", root=root)
    return files


@pytest.fixture(scope="module")
def served(user_files, tmp_path_factory, running_server):
    """Both models built, calibrated and written into one repository by the command line, then served."""
    root, repository = user_files["root"], tmp_path_factory.mktemp("repository")
    text_out, image_out = root / "built" / "topics", root / "built" / "fashion"
    outputs = {
        "text_build": run(
            ["build", "--model", str(user_files["text_model"]), "--train", str(user_files["text_train"]),
             "--test", str(user_files["text_test"]), "--text-column", "sentence", "--label-column", "topic",
             "--name", "topics", "--out", str(text_out), "--max-length", "32", "--quiet"]
        ),
        "image_build": run(
            ["build", "--config", str(EXAMPLES / "resnet18_images.toml"),
             "--weights", str(user_files["weights"]), "--train", str(user_files["images"] / "train"),
             "--test", str(user_files["images"] / "test"),
             "--image-size", "24", "--resize", "26", "--mean", "0.3,0.3,0.3", "--std", "0.35,0.35,0.35",
             "--epochs", "2", "--name", "fashion", "--out", str(image_out), "--quiet"]
        ),
    }  # fmt: skip
    for out in (text_out, image_out):
        outputs[f"calibrate_{out.name}"] = run(
            ["calibrate", "--artifacts", str(out), "--epsilon", "0.1", "--delta", "0.1", "--evaluate-test",
             "--report", str(out / "report"), "--quiet"]
        )  # fmt: skip
        argv = ["repository", "--artifacts", str(out), "--repository", str(repository)]
        outputs[f"repository_{out.name}"] = run(argv)
    with running_server(repository) as server:
        yield server, outputs, text_out, image_out


def test_each_step_says_what_it_did(served):
    _, outputs, text_out, image_out = served
    assert "topics: 3 exits, 3 classes (sport, food, weather); mode attach" in outputs["text_build"]
    assert "fashion: 4 exits, 10 classes (bag, boot, coat" in outputs["image_build"]
    for out in (text_out, image_out):
        calibrated = outputs[f"calibrate_{out.name}"]
        assert f"-> {out / 'policy.json'}" in calibrated and "test split (" in calibrated
        repository_output = outputs[f"repository_{out.name}"]
        assert f"from {out / 'policy.json'}" in repository_output
        # The backend folder the printed by-hand command names exists before any `offramp serve`.
        backends = repository_output.split("--backend-directory=", 1)[1].split()[0]
        assert Path(backends, "python", "libtriton_python.so").exists()
    # The report names the classes.
    report = (text_out / "report" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in CLASSES)
    policy = Policy.load(text_out / "policy.json")
    assert policy.model_fingerprint == ModelArtifacts.load(text_out).fingerprint


def test_text_is_classified_by_name(served):
    server, *_ = served
    printed = run(["infer", "--url", server.grpc_url, "--model", "topics", "--text", "the storm and the rain",
                   "--text", "a goal by the team", "--text", "cheese soup"])  # fmt: skip
    rows = [json.loads(line) for line in printed.splitlines()]
    assert [row["label_name"] for row in rows] == ["weather", "sport", "food"]
    assert all(CLASSES[row["label"]] == row["label_name"] for row in rows)


def test_images_and_test_rows_are_classified_by_name(served, user_files):
    server, _, text_out, image_out = served
    pngs = sorted((user_files["images"] / "test").glob("*/*.png"))[:3]
    printed = run(["infer", "--url", server.grpc_url, "--model", "fashion", *(f"--image={p}" for p in pngs)])
    rows = [json.loads(line) for line in printed.splitlines()]
    assert len(rows) == 3 and all(row["label_name"] == FASHION_SORTED[row["label"]] for row in rows)
    for model, out in (("topics", text_out), ("fashion", image_out)):
        argv = ["infer", "--url", server.grpc_url, "--model", model, "--artifacts", str(out), "--rows", "5"]
        printed = run(argv)
        rows = [json.loads(line) for line in printed.splitlines()]
        assert len(rows) == 5 and all(row["label_name"] for row in rows)


def test_calibration_rows_from_files_of_the_builds_kinds(served, user_files, tmp_path):
    """`offramp calibrate --data` takes what the build took: a JSON Lines file of text, a folder of PNGs."""
    _, _, text_out, image_out = served
    for out, data in ((text_out, user_files["text_test"]), (image_out, user_files["images"] / "test")):
        printed = run(["calibrate", "--artifacts", str(out), "--data", str(data), "--epsilon", "0.1",
                       "--out", str(tmp_path / f"{out.name}.json"), "--quiet"])  # fmt: skip
        policy = Policy.load(tmp_path / f"{out.name}.json")
        rows = policy.provenance["calibration_rows"] + policy.provenance["fit_rows"]  # certify + fit
        assert rows == 60 and f"-> {tmp_path}" in printed


def test_perf_analyzer_runs_as_printed_on_real_rows(served, tmp_path):
    """`offramp input-data` writes real test rows and prints the perf_analyzer command; run as printed
    (its library path included), every request is answered."""
    server, _, text_out, image_out = served
    for out in (text_out, image_out):
        printed = run(["input-data", "--artifacts", str(out), "--rows", "32", "--url", server.grpc_url,
                       "--out", str(tmp_path / f"{out.name}.json")])  # fmt: skip
        assert printed.startswith("32 rows of ")
        command = printed.split("run (against offramp serve): ", 1)[1].strip()
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert (tmp_path / "perf_analyzer.csv").read_text().startswith("Concurrency,")


def test_a_bad_image_is_refused_with_its_reason(served, tmp_path):
    server, *_ = served
    (tmp_path / "not.png").write_bytes(b"plain text, not an image")
    argv = ["infer", "--url", server.grpc_url, "--model", "fashion", "--image", str(tmp_path / "not.png")]
    status, _, err = offramp(argv)
    assert status == 1 and "IMAGE_BYTES row 0" in err, err


FASHION_SORTED = tuple(sorted(FASHION))  # class folders are classes in name order
