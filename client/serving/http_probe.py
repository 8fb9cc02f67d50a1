"""``offramp health`` over Triton's HTTP endpoint with the standard library only: an exec probe for a stock
Triton container.

NVIDIA's Triton image has a ``python3`` but neither offramp nor tritonclient, and Triton's own
``/v2/health/ready`` and ``/v2/models/<name>/ready`` stay 200 while a dead Python-backend stub fails
every request (README, "When a process dies"). So the Kubernetes manifests
(``offramp.client.serving.kubernetes``) ship this one file in a ConfigMap and run it in the Triton
container as the readiness and liveness probe. It asks what ``offramp.client.serving.health`` asks, over
the KServe v2 HTTP/JSON protocol instead of gRPC: per model, one canary row through every segment
(``min_exit`` -1) and one forced to full depth, and it gives the same verdicts and exit statuses
(0 ready, 1 live but not ready, 2 down; with ``--live``, 0 whenever the service answers). The
constants below are offramp's own, restated because this file imports nothing of offramp; a test
checks that they agree, and that this probe and ``offramp health`` agree on a real server.

    python3 offramp_probe.py --url http://127.0.0.1:8000 --model fashion_cnn [--live]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

FLAG_DEGRADED = 128  # offramp.backend.contract.FLAG_DEGRADED: an answer below full quality
READY, LIVE, DOWN = 0, 1, 2  # offramp.client.cli.health's exit statuses
CANARY_TEXT = "health check"  # offramp.client.serving.health.CANARY_TEXT
TEXT_INPUT = "TEXT"  # offramp.backend.text.TEXT_INPUT
CANARY_PARAMETERS = ({"min_exit": -1}, {"force_full": True})  # through every segment; at full depth


def _request(url: str, body: dict | None, timeout_s: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    # No proxy: the probe asks the server in its own container.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout_s) as response:
        return json.load(response)


def canary_inputs(metadata: dict) -> list[dict]:
    """One row per input the model needs: TEXT alone where it takes text, else zeros."""
    inputs = {i["name"]: i for i in metadata["inputs"]}
    if TEXT_INPUT in inputs:
        return [{"name": TEXT_INPUT, "shape": [1, 1], "datatype": "BYTES", "data": [CANARY_TEXT]}]
    rows = []
    for name, spec in inputs.items():
        shape = [1, *(1 if int(d) < 0 else int(d) for d in spec["shape"][1:])]
        size = 1
        for d in shape:
            size *= d
        zero = False if spec["datatype"] == "BOOL" else 0
        rows.append({"name": name, "shape": shape, "datatype": spec["datatype"], "data": [zero] * size})
    return rows


def ask(
    url: str, model: str, inputs: list[dict], parameters: dict, timeout_s: float
) -> tuple[int | None, str]:
    """The canary's FLAGS, OR-ed over its row, or None and why it was not answered."""
    body = {"inputs": inputs, "outputs": [{"name": "FLAGS"}], "parameters": parameters}
    try:
        answer = _request(f"{url}/v2/models/{model}/infer", body, timeout_s)
    except urllib.error.HTTPError as error:
        return None, f"HTTP {error.code}: {error.read().decode(errors='replace')[:200]}"
    except (OSError, ValueError) as error:
        return None, str(error)[:200]
    flags = 0
    for output in answer.get("outputs", []):
        if output["name"] == "FLAGS":
            for value in output["data"]:
                flags |= int(value)
    return flags, ""


def check(url: str, models: Sequence[str], timeout_s: float) -> tuple[bool, bool, list[str]]:
    """(live, ready, one line per canary) over every model: live where some canary of each model was
    answered, ready where every canary was answered at full quality."""
    live = ready = bool(models)
    lines = []
    for model in models:
        try:
            inputs = canary_inputs(_request(f"{url}/v2/models/{model}", None, timeout_s))
        except (OSError, ValueError, KeyError) as error:
            lines.append(f"{model}: metadata FAILED ({str(error)[:200]})")
            live = ready = False
            continue
        answered = False
        for parameters in CANARY_PARAMETERS:
            flags, problem = ask(url, model, inputs, parameters, timeout_s)
            name = "full depth" if parameters.get("force_full") else "segments"
            lines.append(
                f"{model} {name}: " + (f"FAILED ({problem})" if flags is None else f"answered, flags {flags}")
            )
            answered |= flags is not None
            ready &= flags is not None and not flags & FLAG_DEGRADED
        live &= answered
    return live, ready and live, lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Triton's HTTP endpoint")
    parser.add_argument("--model", action="append", required=True, help="an orchestrator model (repeatable)")
    parser.add_argument(
        "--live", action="store_true", help="a liveness probe: 0 whenever the service answers"
    )
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds per request")
    args = parser.parse_args(argv)
    live, ready, lines = check(args.url.rstrip("/"), args.model, args.timeout)
    print("\n".join(lines))
    if ready or (args.live and live):
        return READY
    return LIVE if live else DOWN


if __name__ == "__main__":
    sys.exit(main())
