"""What a user of an offramp service imports: ``from offramp.client import OfframpClient``.

The rest of the folder is the server side (``offramp.client.serving``: the embedded tritonserver,
live policy control), the measuring tools (``offramp.client.tools``: demo, bench, perf_analyzer,
soak, gpu-check) and the command line (``offramp.client.cli``). The names below load on first use,
so that the tools and the command line do not pull in gRPC until they need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from offramp.client.grpc_client import OfframpClient, Predictions, predictions_to_json

__all__ = ["OfframpClient", "Predictions", "predictions_to_json"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from offramp.client import grpc_client

        return getattr(grpc_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
