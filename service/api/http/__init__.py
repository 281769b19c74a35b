"""The HTTP door: OpenAI-compatible chat completions, the native SSE stream, polling, cancel, a page."""

from service.api.http.door import HttpDoor

__all__ = ["HttpDoor"]
