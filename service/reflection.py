"""Server reflection that serves the contract with its comments.

The generated `_pb2` modules carry descriptors without source info, so plain reflection would
show grpcurl and buf users an uncommented contract. `make proto` also writes
`tokenwire/v1/generation.binpb`, a descriptor set with source info; this module serves those
file descriptors in place of the stripped ones.

It serves the reflection protocol twice: as `grpc.reflection.v1` and `grpc.reflection.v1alpha`. grpcio-reflection
implements only v1alpha, but v1 is the same protocol renamed (grpc's v1/reflection.proto is v1alpha's messages and
service, field for field, in another package), so the v1alpha servicer answers v1 calls byte for byte. grpcurl and
buf curl try v1 first; without it they log a fallback and make a second call. The v1 file descriptor is built from
v1alpha's with the package renamed and added to the pool, so that `describe grpc.reflection.v1.ServerReflection`
works too.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

DESCRIPTOR_SET = ("tokenwire.v1", "generation.binpb")
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"


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


def _add_v1_descriptor() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default pool: v1alpha's file with its package renamed."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return  # a second server in this process, or grpcio-reflection has v1 now
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = name, V1_PACKAGE
    proto.ClearField("options")  # v1alpha's language options name v1alpha's packages
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # scalars have none; setting it, even to "", makes one
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    _add_v1_descriptor()
    names = (*service_names, V1_SERVICE_NAME, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names, pool=_CommentedPool())
    reflection.enable_server_reflection(names, server, pool=_CommentedPool())
    # v1 messages are v1alpha's on the wire, so v1alpha's classes parse and serialize them.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha.ServerReflectionRequest.FromString,
        response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
