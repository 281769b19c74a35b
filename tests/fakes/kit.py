"""What the conformance suite (tests/test_conformance.py) needs to know of one provider: its fake,
a route on it, the credentials it takes, and its vendor's finish reasons. Each fake module defines
its provider's kits; adding a provider to the suite is one line there."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .server import FakeServer


@dataclass(frozen=True)
class Kit:
    # The suite's name for it (also the route's name).
    name: str
    provider: str
    model: str
    fake: Callable[[], FakeServer]
    # The route's options for a fake at `base_url` (the credentials come from `env`).
    options: Callable[[str], dict[str, Any]]
    # Environment variables that hold the fake's credentials, and ones that hold wrong ones.
    env: Callable[[FakeServer], dict[str, str]]
    bad_env: Callable[[FakeServer], dict[str, str]]
    # Values that must never appear in a log line, a status or a message.
    secrets: Callable[[FakeServer], list[str]]
    # Every raw finish reason of the vendor -> the contract's FinishReason name.
    finish_reasons: Mapping[str, str]
    # The raw reason of a plain answer's end.
    text_finish: str
    reasoning: bool = False
    # Whether the provider takes tools (a generic endpoint has none to offer).
    tools: bool = True
    # Whether a finish reason the vendor has not documented ends the stream as a finish (OTHER, the
    # raw reason kept) or, where the vendor's reasons only ever name failures, as an error.
    unknown_reason_finishes: bool = True
    # Variables to remove for the route to read only what `env` sets.
    unset: tuple[str, ...] = field(default=())
