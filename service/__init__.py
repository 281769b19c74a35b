"""tokenwire server: a gRPC gateway that streams LLM responses from many providers."""

__version__ = "0.1.0"
