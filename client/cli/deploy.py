"""``offramp deploy kubernetes``: Kustomize and KServe manifests for a repository on a stock Triton image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from offramp.client.cli.options import add_config_options, config_from_args
from offramp.client.cli.subcommand import DEFAULT_REPOSITORY, Subcommand

TARGETS = ("kubernetes",)


class DeployCommand(Subcommand):
    name = "deploy"
    help = "write Kubernetes (Kustomize) and KServe manifests that serve a repository on a stock Triton"
    description = (
        "Writes a Kustomize base (Deployment of the stock tritonserver image with the flags, /dev/shm and "
        "probes the repository needs, Services, HPA, ServiceMonitor, PrometheusRule, Grafana dashboard), "
        "overlays for the repository on a PersistentVolumeClaim or in S3 and for KEDA instead of the HPA, a "
        "KServe InferenceService, and the prometheus-adapter rule. Render with "
        "`kubectl kustomize OUT/overlays/pvc`."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.client.serving.kubernetes import KubernetesOptions

        parser.add_argument("target", choices=TARGETS)
        parser.add_argument(
            "--repository",
            type=Path,
            default=DEFAULT_REPOSITORY,
            help="the model repository the replicas serve (default: %(default)s)",
        )
        parser.add_argument("--out", type=Path, default=Path("kubernetes"), help="default: %(default)s")
        add_config_options(parser, KubernetesOptions)

    def run(self, args: argparse.Namespace) -> int:
        from offramp.client.serving.kubernetes import (
            KubernetesOptions,
            RepositoryNeeds,
            Service,
            storage_notes,
            write_kubernetes,
        )

        try:
            options = config_from_args(KubernetesOptions, args)
            needs = RepositoryNeeds.read(args.repository)
            written = write_kubernetes(args.repository, args.out, options)
        except (ValueError, OSError) as error:
            print(f"offramp deploy: error: {error}", file=sys.stderr)
            return 2
        service = Service(options, needs)
        print(
            f"{len(written)} files under {args.out}/ for {service.name} "
            f"(models probed: {', '.join(needs.orchestrators)})"
        )
        print(
            f"  /dev/shm {needs.shm_bytes(options) / 2**20:.0f} MiB for {needs.python_instances} "
            f"Python-model instances, batch {needs.max_batch}, largest row {needs.largest_row_bytes} bytes; "
            f"GPUs per replica: {needs.gpus(options)}"
        )
        for note in storage_notes(needs, options):
            print(f"  note: {note}")
        if not options.s3_url:
            print("  note: overlays/s3 names a placeholder bucket; give --s3-url to serve from S3")
        print(
            f"next: kubectl create secret generic {service.admin_secret} "
            "--from-literal=key=$(openssl rand -hex 24)"
        )
        print(f"      kubectl apply -k {args.out}/overlays/pvc   (or overlays/s3, overlays/keda, kserve)")
        return 0
