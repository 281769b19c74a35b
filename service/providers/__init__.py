"""Provider adapters. Adding a provider means one module here and one line in `KINDS`."""

from __future__ import annotations

import importlib

from service.config import ConfigError, RouteConfig
from service.providers.base import Provider

# Provider kind -> its class, or "module:Class" until a route needs it: the vendor SDKs take
# over a second to import, which a server of simulated routes should not pay.
KINDS: dict[str, type[Provider] | str] = {
    "simulated": "service.providers.simulated:SimulatedProvider",
    "openai": "service.providers.openai:OpenAIProvider",
    "azure-openai": "service.providers.openai:AzureOpenAIProvider",
    "openai-compatible": "service.providers.openai:OpenAICompatibleProvider",
    "anthropic": "service.providers.anthropic:AnthropicProvider",
    "bedrock": "service.providers.bedrock:BedrockProvider",
    "gemini": "service.providers.gemini:GeminiProvider",
    "watsonx": "service.providers.watsonx:WatsonxProvider",
    "sse-endpoint": "service.providers.sse_endpoint:SSEEndpointProvider",
    "replicate": "service.providers.replicate:ReplicateProvider",
}


def provider_class(kind: str) -> type[Provider]:
    try:
        entry = KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown provider {kind!r}; known: {', '.join(sorted(KINDS))}") from None
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = KINDS[kind] = getattr(importlib.import_module(module), name)
    return entry


def create_provider(route: RouteConfig) -> Provider:
    try:
        kind = provider_class(route.provider)
    except ConfigError as exc:
        raise ConfigError(f"[routes.{route.name}] {exc}") from None
    return kind(route)
