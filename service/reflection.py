"""Server reflection that serves the contract with its comments.

The generated `_pb2` modules carry descriptors without source info, so plain reflection would
show grpcurl and buf users an uncommented contract. `make proto` also writes
`tokenwire/v1/generation.binpb`, a descriptor set with source info; this module serves those
file descriptors in place of the stripped ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection

DESCRIPTOR_SET = ("tokenwire.v1", "generation.binpb")


def _commented_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    data = resources.files(DESCRIPTOR_SET[0]).joinpath(DESCRIPTOR_SET[1]).read_bytes()
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(data).file}


class _CommentedFile:
    """A file descriptor whose CopyToProto includes the .proto comments when we have them."""

    def __init__(self, descriptor: Any, commented: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
        self._descriptor = descriptor
        self._commented = commented
        self.name: str = descriptor.name

    @property
    def dependencies(self) -> list[_CommentedFile]:
        return [_CommentedFile(d, self._commented) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        source = self._commented.get(self.name)
        if source is None:
            self._descriptor.CopyToProto(proto)
        else:
            proto.CopyFrom(source)


class _CommentedPool:
    """The default descriptor pool, answering file look-ups with commented descriptors."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()
        self._commented = _commented_files()

    def FindFileByName(self, name: str) -> _CommentedFile:
        return _CommentedFile(self._pool.FindFileByName(name), self._commented)

    def FindFileContainingSymbol(self, symbol: str) -> _CommentedFile:
        return _CommentedFile(self._pool.FindFileContainingSymbol(symbol), self._commented)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    reflection.enable_server_reflection((*service_names, reflection.SERVICE_NAME), server, pool=_CommentedPool())
