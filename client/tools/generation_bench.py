"""``offramp bench --workload generation``: the decoding modes side by side on one server."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def prompt_input_data(path: Path, prompts: Sequence[str]) -> Path:
    """perf_analyzer ``--input-data`` with one prompt per entry (``PROMPT``, BYTES ``[1]``)."""
    entries = [{"PROMPT": {"content": [prompt], "shape": [1]}} for prompt in prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path
