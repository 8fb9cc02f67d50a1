"""``offramp infer``: classify rows through gRPC, one JSON line per row."""

from __future__ import annotations

import argparse

from offramp.client.cli.subcommand import DEFAULT_GRPC_URL, Subcommand


class InferCommand(Subcommand):
    name = "infer"
    help = "classify images through gRPC; one JSON line per row"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--url", default=DEFAULT_GRPC_URL)
        add("--model", default="fashion_cnn")
        add("--npy", help="a .npy of images (n, 1, 28, 28) in [0, 1]; default: Fashion-MNIST test rows")
        add("--first", type=int, default=0)
        add("--rows", type=int, default=4)
        add("--force-full", action="store_true")
        add("--min-exit", type=int)
        add("--max-exit", type=int)
        add("--request-id")

    def run(self, args: argparse.Namespace) -> int:
        import numpy as np

        from offramp.client.grpc_client import OfframpClient, predictions_to_json

        images = np.load(args.npy).astype(np.float32) if args.npy else None
        if images is None:
            from offramp.build.fashion_mnist import load_fashion_mnist

            images = load_fashion_mnist("test")[0][args.first : args.first + args.rows]
        with OfframpClient(args.url) as client:
            predictions = client.classify(
                args.model,
                images,
                force_full=args.force_full or None,
                min_exit=args.min_exit,
                max_exit=args.max_exit,
                request_id=args.request_id,
            )
        print(predictions_to_json(predictions))
        return 0
