"""A typed Python client for tokenwire, the gRPC streaming gateway for LLM responses.

Example::

    async with AsyncClient("localhost:50051") as client:
        async with client.generate("sim", [user("Hello")]) as stream:
            async for text in stream.text_stream:
                print(text, end="", flush=True)
            response = await stream.get_final_response()
"""

from ._accumulate import StreamAccumulator
from ._client import DEFAULT_TARGET, AsyncClient, GenerationStream
from ._errors import (
    APIStatusError,
    AuthenticationError,
    ClientClosedError,
    DeadlineExceededError,
    Fault,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StreamCancelledError,
    StreamIntegrityError,
    StreamProtocolError,
    TokenwireError,
    TruncatedStreamError,
    UnavailableError,
    error_from_status,
)
from ._events import (
    Event,
    Finished,
    FinishReason,
    Heartbeat,
    ModelInfo,
    ReasoningBlock,
    ReasoningDelta,
    Response,
    Snapshot,
    Started,
    TextDelta,
    Timing,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageSource,
)
from ._messages import (
    MessageLike,
    RequestOptions,
    ToolLike,
    assistant,
    build_request,
    system,
    tool_result,
    user,
)
from ._sync import Client, SyncGenerationStream

__all__ = [
    "DEFAULT_TARGET",
    "APIStatusError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ClientClosedError",
    "DeadlineExceededError",
    "Event",
    "Fault",
    "FinishReason",
    "Finished",
    "GenerationStream",
    "Heartbeat",
    "InternalServerError",
    "InvalidRequestError",
    "MessageLike",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ReasoningBlock",
    "ReasoningDelta",
    "RequestOptions",
    "Response",
    "Snapshot",
    "Started",
    "StreamAccumulator",
    "StreamCancelledError",
    "StreamIntegrityError",
    "StreamProtocolError",
    "SyncGenerationStream",
    "TextDelta",
    "Timing",
    "TokenwireError",
    "ToolCall",
    "ToolCallDelta",
    "ToolLike",
    "TruncatedStreamError",
    "UnavailableError",
    "Usage",
    "UsageSource",
    "assistant",
    "build_request",
    "error_from_status",
    "system",
    "tool_result",
    "user",
]
