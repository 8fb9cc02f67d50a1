"""``offramp input-data``: real rows as perf_analyzer's ``--input-data`` JSON, and the command to run it.

perf_analyzer's own random data fails every request of a model whose inputs have limits (token ids past
the vocabulary, NaN pixels); the rows here are what the build was tested on, or a data file's, made
into the model's inputs by the build's own preprocessing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from offramp.client.cli.subcommand import DEFAULT_GRPC_URL, DEFAULT_WORKDIR, Subcommand, lacks_artifacts


class InputDataCommand(Subcommand):
    name = "input-data"
    help = "write real rows as perf_analyzer --input-data JSON and print the perf_analyzer command"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--artifacts", type=Path, default=DEFAULT_WORKDIR / "fashion_cnn", help="the build's folder")
        add("--data", type=Path, help="rows of the kinds calibrate --data takes (default: the test split)")
        add("--rows", type=int, default=256, help="rows written (perf_analyzer cycles through them)")
        add("--out", type=Path, help="the JSON file (default: input_data.json in the artifacts folder)")
        add("--url", default=DEFAULT_GRPC_URL, help="gRPC address, for the printed command")
        add("--batch-size", type=int, default=8, help="rows per request, for the printed command")
        add("--concurrency", type=int, default=4, help="requests in flight, for the printed command")

    def run(self, args: argparse.Namespace) -> int:
        from offramp.build.artifacts import MANIFEST, ModelArtifacts
        from offramp.build.calibrate import data_file_rows, held_out_data
        from offramp.build.model_build import user_errors
        from offramp.client.tools.perf_analyzer import (
            PerfAnalyzerError,
            PerfAnalyzerOptions,
            perf_analyzer_binary,
            perf_analyzer_environment,
            write_input_data,
        )

        if lacks_artifacts(
            "input-data", args.artifacts, MANIFEST, "pass a build's folder (offramp build prints it)"
        ):
            return 2
        artifacts = ModelArtifacts.load(args.artifacts)
        try:
            if args.data:
                data = data_file_rows(artifacts, args.artifacts, args.data)
            else:
                data = held_out_data(artifacts, args.artifacts, "test")
            binary = perf_analyzer_binary()
        except (*user_errors(), ValueError, PerfAnalyzerError) as error:
            print(f"offramp input-data: error: {error}", file=sys.stderr)
            return 2
        inputs = {name: array[: args.rows] for name, array in data.inputs.items()}
        if "ATTENTION_MASK" in inputs:  # token rows: as long as the longest row kept, not the whole split's
            longest = max(int(inputs["ATTENTION_MASK"].sum(axis=1).max()), 1)
            inputs = {name: array[:, :longest] for name, array in inputs.items()}
        out = args.out or args.artifacts / "input_data.json"
        write_input_data(out, inputs)
        rows = len(next(iter(inputs.values())))
        # perf_analyzer sends one shape per input: every row has the same, stated for the variable axes.
        shapes = {name: list(array.shape[1:]) for name, array in inputs.items()}
        options = PerfAnalyzerOptions(
            url=args.url, model=artifacts.name, input_data=out, concurrency=args.concurrency,
            batch_size=args.batch_size, shapes=shapes,
        )  # fmt: skip
        command = options.command(binary, out.with_name("perf_analyzer.csv"))
        library_path = perf_analyzer_environment({}).get("LD_LIBRARY_PATH")
        environment = f"LD_LIBRARY_PATH={shlex.quote(library_path)} " if library_path else ""
        print(f"{rows} rows of {', '.join(inputs)} -> {out}")
        print(f"run (against offramp serve): {environment}{shlex.join(command)}")
        return 0
