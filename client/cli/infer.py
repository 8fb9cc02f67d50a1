"""``offramp infer``: classify rows through gRPC, one JSON line per row."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from offramp.client.cli.subcommand import DEFAULT_GRPC_URL, DEFAULT_WORKDIR, Subcommand


class InferCommand(Subcommand):
    name = "infer"
    help = "classify text, images or tensors through gRPC; one JSON line per row"
    description = (
        "Classify rows with a served model, one JSON line per row (label and label name, exit, confidence, "
        "cost, flags). Send raw text (--text), encoded JPEG/PNG files (--image), the model's input tensor "
        "(--npy), or, with none of these, rows of the held-out test split of the build in --artifacts "
        "(default: .cache/offramp/<model>)."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--url", default=DEFAULT_GRPC_URL)
        add("--model", default="fashion_cnn", help="the served model's name")
        add("--text", action="append", help="a text to classify (repeatable)")
        add("--image", action="append", type=Path, help="a JPEG or PNG file to classify (repeatable)")
        add("--npy", type=Path, help="a .npy of rows of the model's input tensor, (n, ...) in its dtype")
        add("--artifacts", type=Path, help="the build whose test rows to send when no input is given")
        add("--first", type=int, default=0, help="the first test row sent")
        add("--rows", type=int, default=4, help="test rows sent")
        add("--force-full", action="store_true")
        add("--min-exit", type=int)
        add("--max-exit", type=int)
        add("--request-id")

    def run(self, args: argparse.Namespace) -> int:
        import numpy as np
        from tritonclient.utils import InferenceServerException

        from offramp.client.grpc_client import OfframpClient, predictions_to_json

        given = [
            flag
            for flag, value in (("--text", args.text), ("--image", args.image), ("--npy", args.npy))
            if value
        ]
        if len(given) > 1:
            print(f"offramp infer: error: give one kind of input, not {' and '.join(given)}", file=sys.stderr)
            return 2
        policy = dict(
            force_full=args.force_full or None, min_exit=args.min_exit, max_exit=args.max_exit,
            request_id=args.request_id,
        )  # fmt: skip
        try:
            with OfframpClient(args.url) as client:
                if args.text:
                    predictions = client.classify_text(args.model, args.text, **policy)
                elif args.image:
                    predictions = client.classify_images(
                        args.model, [read_file(path) for path in args.image], **policy
                    )
                elif args.npy:
                    predictions = client.classify(args.model, np.load(args.npy), **policy)
                else:
                    predictions = classify_test_rows(client, args, policy)
        except (OSError, ValueError) as error:
            print(f"offramp infer: error: {error}", file=sys.stderr)
            return 2
        except InferenceServerException as error:
            print(f"offramp infer: the server refused: {error.message()}", file=sys.stderr)
            return 1
        print(predictions_to_json(predictions))
        return 0


def read_file(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path.read_bytes()


def classify_test_rows(client, args: argparse.Namespace, policy: dict):
    """Rows ``--first`` .. ``--first + --rows`` of the build's test split, as a client would send them:
    raw text to a text model, the preprocessed tensor to others."""
    from offramp.build.artifacts import MANIFEST, ModelArtifacts

    directory = args.artifacts or DEFAULT_WORKDIR / args.model
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{directory} holds no {MANIFEST}: give --text, --image or --npy, or a build's --artifacts"
        )
    artifacts = ModelArtifacts.load(directory)
    part = slice(args.first, args.first + args.rows)
    if artifacts.build.get("tokenizer_dir"):
        from offramp.build.text_recipes import text_splits_of

        return client.classify_text(args.model, text_splits_of(artifacts).test.texts[part], **policy)
    from offramp.build.calibrate import held_out_data

    test = held_out_data(artifacts, directory, "test")
    return client.classify(args.model, {name: array[part] for name, array in test.inputs.items()}, **policy)
