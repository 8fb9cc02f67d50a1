"""What a client of an offramp generator sends and receives (no heavy imports: the client reads it too).

The generator is a decoupled Triton model with no batch axis: one request is one prompt, answered by
a stream of responses. Input ``PROMPT`` (BYTES ``[1]``, UTF-8). Every response carries ``TEXT`` (the
new text, BYTES ``[1]``), ``TOKEN_IDS`` and ``TOKEN_EXITS`` (INT32 ``[-1]``: the tokens committed and the
exit that chose each) and ``ATTEMPT`` (INT32 ``[1]``: 0, or 1 once a failed check restarted the
completion at full depth); the final one (Triton's ``triton_final_response``) also ``FLAGS`` and
``FINISH_REASON`` (``stop``, ``length``, ``end_of_text``, ``context``), which earlier ones leave 0 and
empty.
"""

from offramp.backend.contract import FLAG_DEADLINE

PROMPT_INPUT = "PROMPT"
OUTPUTS = {  # name -> (dtype, dims; the model takes no batch axis)
    "TEXT": ("object", (1,)),
    "TOKEN_IDS": ("int32", (-1,)),
    "TOKEN_EXITS": ("int32", (-1,)),
    "ATTEMPT": ("int32", (1,)),
    "FLAGS": ("int32", (1,)),
    "FINISH_REASON": ("object", (1,)),
}
PARAMETERS = (
    "max_tokens",
    "stop",
    "mode",
    "deadline_ms",
    "check",
    "check_schema",
    "check_pattern",
    "request_id",
)
FLAG_ESCALATED = 512  # a check failed at a shallow depth: the request was generated again at full depth
FLAG_CHECK_FAILED = 1024  # the answer fails its check (at full depth, or past its deadline)
GENERATION_FLAG_NAMES = {
    FLAG_DEADLINE: "deadline",
    FLAG_ESCALATED: "escalated",
    FLAG_CHECK_FAILED: "check_failed",
}
# Errors name their request ("[request_id <id>] message"): on a gRPC stream nothing else does.
ERROR_ID_PREFIX = "[request_id "
