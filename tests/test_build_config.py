"""The build configuration: TOML and flags into one checked BuildConfig, clear errors for what does not
fit, and the three example configs that reproduce the recipes' builds (the same build keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offramp.build.build_cache import CachedBuild
from offramp.build.build_config import SECTIONS, ConfigError, build_config, load_build_config
from offramp.client.cli.main import main, parser

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def config_of(text: str, tmp_path: Path, flags: list[str] = ()):
    """The BuildConfig ``offramp build --config FILE [flags]`` would build."""
    from offramp.client.cli.build import config_of

    path = tmp_path / "reviews.toml"
    path.write_text(text)
    return config_of(parser().parse_args(["build", "--config", str(path), *flags]))


TEXT_CONFIG = """
[model]
path = "models/bert"
exits = [2, 4]

[data]
train = "data/train.csv"
test = "data/test.jsonl"
text_column = "review"
labels = ["neg", "pos"]

[split]
calibration = 500

[train]
mode = "attach"
learning_rate = 1
"""


def test_a_file_gives_typed_values_relative_to_itself_and_flags_override_them(tmp_path):
    config = config_of(TEXT_CONFIG, tmp_path, ["--epochs", "7", "--test-share", "0.2", "--seed", "3"])
    assert config.name == "reviews" and config.out == Path(".cache/offramp/reviews")
    assert config.kind == "text" and config.model.path == str(tmp_path / "models/bert")
    assert config.model.exits == (2, 4)
    assert config.data.train == tmp_path / "data/train.csv"
    assert config.data.test == tmp_path / "data/test.jsonl"
    assert config.data.text_column == "review" and config.data.label_column == "label"
    assert config.data.labels == ("neg", "pos")
    # A number of rows stays an integer, a share a float; an integer where a float is meant is a float.
    assert config.split.calibration == 500 and isinstance(config.split.calibration, int)
    assert config.split.test == 0.2 and config.split.seed == 3
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.train.epochs == 7 and config.train.mode == "attach"
    named = config_of(TEXT_CONFIG, tmp_path, ["--name", "other", "--out", "x/y", "--model", "elsewhere"])
    assert named.name == "other" and named.out == Path("x/y") and named.model.path == "elsewhere"


BASE = "[model]\npath = 'm'\n[data]\ntrain = 't.csv'\n"  # a model and its data: the least a config names


@pytest.mark.parametrize(
    "text, message",
    [
        (BASE + "[modle]\nx = 1\n", r"unknown key\(s\) \['modle'\]"),
        ("[model]\npath = 'm'\n[data]\ntrian = 't.csv'\n", r"\[data\]: unknown key\(s\) \['trian'\]; known"),
        ("[model]\npath = 'm'\nexits = 'all'\n[data]\ntrain = 't.csv'\n", "model.exits: expected a list"),
        ("[model]\npath = 'm'\nexits = [3, 2]\n[data]\ntrain = 't.csv'\n", "increasing"),
        (BASE + "[train]\nepochs = 'two'\n", "epochs: expected an integer"),
        (BASE + "[train]\nmode = 'fine'\n", r"train.mode must be one of"),
        (BASE + "[split]\ncalibration = 1.5\n", "share in"),
        ("[model]\npath = 'm'\n", "data: give train"),
        ("[data]\ntrain = 't.csv'\n", "model: give path"),
        ("[model]\npath = 'm'\narchitecture = 'resnet18'\n[data]\ntrain = 't'\n", "two kinds of model"),
        (BASE + "dataset = 'trec'\n", "not both"),
        ("name = 'my model'\n[model]\npath = 'm'\n[data]\ntrain = 't.csv'\n", "letters, digits"),
        ("[model\npath = 'm'\n", "not a TOML file"),
    ],
)
def test_what_does_not_fit_is_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config_of(text, tmp_path)


def test_a_missing_config_file_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["build", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such config file" in capsys.readouterr().err
    assert not (tmp_path / ".cache").exists()


@pytest.mark.parametrize(
    "example, recorded",
    [("fashion_cnn", "fashion_cnn"), ("trec", "trec_minilm"), ("rotten_tomatoes", "rotten_tomatoes_minilm")],
)
def test_the_example_configs_build_the_recipes(example, recorded, monkeypatch):
    """Each example config asks for the very build its recipe made: the same build key as the builds whose
    results are committed (benchmarks/results), so their caches are reused and their figures stand."""
    from offramp.build.model_build import build_model

    values = load_build_config(ROOT / "examples" / f"{example}.toml")
    config = build_config(values, {s: t(**values.get(s, {})) for s, t in SECTIONS.items()})
    real_look_up, asked = CachedBuild.look_up, {}

    def look_up(out_dir, **parts):
        asked["key"] = real_look_up(out_dir, **parts).key
        raise KeyFound  # no build: the key is what this test is about

    monkeypatch.setattr(CachedBuild, "look_up", look_up)
    with pytest.raises(KeyFound):
        build_model(config)
    summary = json.loads((RESULTS / recorded / "summary.json").read_text())
    assert asked["key"] == summary["model"]["build"]["key"]
    assert config.out == Path(".cache/offramp") / recorded  # where the demo and bench look for it


class KeyFound(Exception):
    pass
