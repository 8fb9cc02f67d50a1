"""Builds reused by key: the key text of earlier builds, and the saved build found by it."""

from __future__ import annotations

import json
from pathlib import Path

from offramp.build.artifacts import ModelArtifacts
from offramp.build.build_cache import CachedBuild, build_key, folder_digest
from offramp.build.train import recorded_settings

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _recorded_build(workload: str) -> dict:
    return json.loads((RESULTS / workload / "summary.json").read_text())["model"]["build"]


def test_the_keys_of_builds_made_before_are_the_same():
    """The benchmark's summaries record each build's key and what it was made from: the key comes out
    the same, so those builds' caches are still recognised. A build records all its settings; its key
    holds distillation fields only where they differ from the default, as the build computes it."""
    cnn = _recorded_build("fashion_cnn")
    assert cnn["key"] == build_key(
        name="fashion_cnn", cnn=cnn["cnn"], train=cnn["train"], data=cnn["data"],
        calibration_rows=cnn["calibration_rows"],
    )  # fmt: skip
    text = _recorded_build("trec_minilm")
    assert text["key"] == build_key(
        name="trec_minilm", task=text["task"], settings=recorded_settings(text["settings"]),
        model=text["model_sha256"], probe=True, recipe=text["recipe_version"],
    )  # fmt: skip


def test_a_checkpoint_keys_a_build_by_its_contents_not_its_location(tmp_path: Path):
    """The same checkpoint in another folder (another checkout, a CI clone) keys the same build; a file
    changed in it keys another."""
    for folder in ("here", "there"):
        (tmp_path / folder / "sub").mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
        (tmp_path / folder / "model.safetensors").write_bytes(b"weights")
        (tmp_path / folder / "sub" / "ignored.txt").write_text(folder)  # subfolders are not the checkpoint
    assert folder_digest(tmp_path / "here") == folder_digest(tmp_path / "there")
    (tmp_path / "there" / "model.safetensors").write_bytes(b"weights, trained again")
    assert folder_digest(tmp_path / "here") != folder_digest(tmp_path / "there")


def _save_build(directory: Path, key: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    build = {"key": key, "epochs": 2}
    ModelArtifacts("m", (), (), ("a", "b"), (), "full.onnx", 1, "f", build=build).save(directory)


def test_a_saved_build_is_reused_for_its_own_key_and_otherwise_only_read(tmp_path: Path):
    empty = CachedBuild.look_up(tmp_path / "none", epochs=2)
    assert empty.reusable is None and empty.previous == {} and empty.key == build_key(epochs=2)

    _save_build(tmp_path / "build", build_key(epochs=2))
    same = CachedBuild.look_up(tmp_path / "build", epochs=2)
    assert same.reusable is not None and same.reusable.build["key"] == same.key
    other = CachedBuild.look_up(tmp_path / "build", epochs=3)
    assert other.reusable is None and other.previous == {"key": build_key(epochs=2), "epochs": 2}
