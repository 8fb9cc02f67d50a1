"""``offramp build``: train (or reuse) and export a multi-exit model, from a TOML config and/or flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from offramp.client.cli.options import add_config_options, config_from_args
from offramp.client.cli.subcommand import Subcommand

if TYPE_CHECKING:
    from offramp.build.artifacts import ModelArtifacts
    from offramp.build.build_config import BuildConfig

# The three recipes of the repository as configs; without --config or a model, the first is built.
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEFAULT_CONFIG = EXAMPLES / "fashion_cnn.toml"


class BuildCommand(Subcommand):
    name = "build"
    help = "train (or reuse) and export a multi-exit model: yours (text or images) or a recipe"
    description = (
        "Build a multi-exit model from a TOML config (--config) and/or the flags below, which override the "
        "file. Text: a transformers folder (a fine-tuned *ForSequenceClassification: attach mode; a base "
        "encoder: joint mode) and CSV/TSV/JSON Lines/Parquet files with a text and a label column. Images: "
        "a torchvision ResNet (or stem-plus-stages) with its state_dict, and class-per-folder images or "
        f".npz. Without --config or a model: {DEFAULT_CONFIG.name} (the Fashion-MNIST CNN). Examples: "
        f"{EXAMPLES}/*.toml."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.build.build_config import SECTIONS

        parser.add_argument("--config", type=Path, help="a build config (TOML); flags override its values")
        parser.add_argument("--name", help="the served model's name (default: the config file's name)")
        parser.add_argument("--out", type=Path, help="artifacts folder (default: .cache/offramp/<name>)")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        for section, section_type in SECTIONS.items():
            group = parser.add_argument_group(f"[{section}]", section_type.__doc__.split(":", 1)[1].strip())
            add_config_options(group, section_type, prefix=f"{section}.")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.build.model_build import build_model, user_errors

        try:
            config = config_of(args)
            artifacts = build_model(config, progress=not args.quiet)
        except user_errors() as error:
            print(f"offramp build: error: {error}", file=sys.stderr)
            return 2
        print_summary(artifacts, config.out)
        return 0


def config_of(args: argparse.Namespace) -> BuildConfig:
    """The checked configuration of ``offramp build ARGS``: the config file's values (the default
    example without a file or a model), the flags laid over them."""
    from offramp.build.build_config import SECTIONS, build_config, load_build_config

    config_file = args.config
    model_given = getattr(args, "model.path") is not None or getattr(args, "model.architecture") is not None
    if config_file is None and not model_given:
        config_file = DEFAULT_CONFIG
    file_values = load_build_config(config_file) if config_file else {}
    sections = {
        section: config_from_args(section_type, args, file_values.get(section, {}), prefix=f"{section}.")
        for section, section_type in SECTIONS.items()
    }
    return build_config(file_values, sections, args.name, args.out)


def print_summary(artifacts: ModelArtifacts, out: Path) -> None:
    """Per exit: test accuracy, agreement with the final head, compute; then the next commands."""
    build = artifacts.build
    agreement = build.get("exit_test_agreement") or [None] * artifacts.num_exits
    print(f"{artifacts.name}: {artifacts.num_exits} exits, {artifacts.num_classes} classes "
          f"({', '.join(artifacts.class_names)}); mode {build.get('mode', 'joint')}")  # fmt: skip
    for index, (accuracy, agree, cost) in enumerate(
        zip(artifacts.exit_test_accuracy, agreement, artifacts.exit_costs, strict=True)
    ):
        agrees = "" if agree is None else f", agreement with the final head {agree:.2%}"
        print(f"exit {index}: test accuracy {accuracy:.2%}{agrees}, compute fraction {cost:.3f}")
    print(f"full network: test accuracy {artifacts.full_test_accuracy:.2%}; artifacts in {out}")
    print("next:")
    print(f"  offramp calibrate --artifacts {out} --out {out}/policy.json --report {out}/report")
    print(f"  offramp repository --artifacts {out} --policy {out}/policy.json")
    print("  offramp serve")
    sample = "--text 'some text'" if build.get("tokenizer_dir") else "--image FILE (or --npy FILE)"
    print(f"  offramp infer --model {artifacts.name} {sample}")
