"""The generation client and ``offramp generate complete`` when the stream itself breaks: one clear error."""

from __future__ import annotations

import pytest

from offramp.client.cli.main import main
from offramp.client.generation_client import GenerationClient, StreamFailed
from offramp.client.serving.server import ServerPorts


def test_a_stream_that_cannot_connect_is_one_clear_error(capsys):
    url = f"127.0.0.1:{ServerPorts.free().grpc}"  # a free port: nothing listens there
    # tritonclient reports the refused connection to the stream's callback and then only says that the
    # stream "is no longer in valid state"; the client raises the callback's reason.
    with pytest.raises(StreamFailed, match=rf"the stream to {url} failed: .*connect"):
        GenerationClient(url, "code_llama").complete("def f():\n", max_tokens=4)
    assert main(["generate", "complete", "def f():", "--url", url, "--max-tokens", "4"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"offramp generate complete: the stream to {url} failed:")
    assert error.count("\n") == 1
