"""Fake LLM providers as real HTTP/1.1 servers on 127.0.0.1, in each vendor's exact streaming wire format.

    async with FakeOpenAI() as fake:
        fake.enqueue(StreamReply(text=["Hi", "!"]), StatusReply(429, headers={"retry-after": "0.2"}))
        client = openai.AsyncOpenAI(api_key=fake.api_key, base_url=fake.base_url, max_retries=0)
        ...
        assert fake.requests[0].body["model"] == "gpt-4o-mini"

Every byte of a reply is rendered before the first one is written, so streaming costs only socket writes.
"""

from .anthropic import FakeAnthropic
from .openai import FakeOpenAI
from .replies import FAULTS, Reply, ResetReply, StatusReply, StreamReply, ToolCallScript, Usage
from .server import FakeServer, RecordedRequest

__all__ = [
    "FAULTS",
    "FakeAnthropic",
    "FakeOpenAI",
    "FakeServer",
    "RecordedRequest",
    "Reply",
    "ResetReply",
    "StatusReply",
    "StreamReply",
    "ToolCallScript",
    "Usage",
]
