"""What callers can make the server log: a header grpc cannot decode is no ERROR line.

A raw HTTP/2 client (h2) sends what no gRPC client would: a request header whose value is not
UTF-8. grpc answers the call, and its Python layer logs an ERROR with a traceback for it; the
server's filter turns exactly that record into a DEBUG line and leaves grpc's other errors alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from conftest import Running
from service.server import CALLER_HEADER_NOISE, GRPC_CORE_LOGGER
from tokenwire.v1 import generation_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATE = b"/tokenwire.v1.GenerationService/Generate"
NOT_UTF8 = b"caf\xe9 \xff\xfe"
Captured = pytest.LogCaptureFixture


async def raw_grpc_call(
    address: str, path: bytes, message: bytes, extra: list[tuple[bytes, bytes]]
) -> dict[bytes, bytes]:
    """One unary-request gRPC call over a bare HTTP/2 connection; returns the trailers."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    # Outbound validation off: h2 would otherwise refuse to send what this test is about.
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", address.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *extra,
    ]
    conn.send_headers(stream, headers)
    conn.send_data(stream, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
    trailers: dict[bytes, bytes] = {}
    try:
        writer.write(conn.data_to_send())
        async with asyncio.timeout(10):
            ended = False
            while not ended:
                data = await reader.read(65536)
                assert data, "the server closed the connection before the call ended"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = {bytes(k): bytes(v) for k, v in event.headers}
                    elif isinstance(event, h2.events.StreamReset):
                        raise AssertionError(f"the server reset the stream: {event.error_code!r}")
                    ended = ended or isinstance(event, h2.events.StreamEnded)
                writer.write(conn.data_to_send())
    finally:
        writer.close()
        await writer.wait_closed()
    return trailers


def generate_message() -> bytes:
    return pb.GenerateRequest(model="sim", messages=[pb.Message(role=pb.ROLE_USER, text="hi")]).SerializeToString()


@pytest.fixture
def grpc_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """grpc's own records, captured at every level: a demoted record shows up as DEBUG."""
    caplog.set_level(logging.DEBUG, logger=GRPC_CORE_LOGGER)
    return caplog


def grpc_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == GRPC_CORE_LOGGER]


async def test_a_header_that_is_not_utf8_writes_no_error_line(running: Running, grpc_log: Captured) -> None:
    trailers = await raw_grpc_call(running.address, GENERATE, generate_message(), [(b"x-label", NOT_UTF8)])

    assert trailers.get(b"grpc-status") == b"0"
    ours = grpc_records(grpc_log)
    assert not [r for r in ours if r.levelno >= logging.WARNING], [r.getMessage() for r in ours]
    # Still there for whoever debugs, as one line: grpc dispatching the call, and the handler
    # reading its metadata.
    demoted = [r for r in ours if "not UTF-8" in r.getMessage()]
    assert len(demoted) == 2 and all(r.levelno == logging.DEBUG and r.exc_info is None for r in demoted)


async def test_without_the_filter_grpc_logs_errors_for_that_header(running: Running, grpc_log: Captured) -> None:
    # The control: the same call, the filter taken off, is what operators saw.
    core = logging.getLogger(GRPC_CORE_LOGGER)
    core.removeFilter(CALLER_HEADER_NOISE)
    try:
        trailers = await raw_grpc_call(running.address, GENERATE, generate_message(), [(b"x-label", NOT_UTF8)])
    finally:
        core.addFilter(CALLER_HEADER_NOISE)

    assert trailers.get(b"grpc-status") == b"0"
    errors = [r for r in grpc_records(grpc_log) if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(isinstance(r.exc_info and r.exc_info[1], UnicodeDecodeError) for r in errors)


def test_other_grpc_errors_keep_their_level() -> None:
    def record(msg: str, args: tuple[object, ...], exc: BaseException | None) -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord(GRPC_CORE_LOGGER, logging.ERROR, __file__, 1, msg, args, exc_info)

    others = [
        record("Unexpected [%s] raised by servicer method [%s]", ("RuntimeError", "/x"), RuntimeError("boom")),
        # The same message with another cause is not the caller's header.
        record("Invalid encoding on %s", (b"x",), RuntimeError("boom")),
        record("Invalid encoding on %s", (b"x",), None),
    ]
    for other in others:
        assert CALLER_HEADER_NOISE.filter(other)
        assert other.levelno == logging.ERROR and other.msg in ("Invalid encoding on %s", others[0].msg)


async def test_a_valid_header_logs_nothing_from_grpc(running: Running, grpc_log: Captured) -> None:
    trailers = await raw_grpc_call(running.address, GENERATE, generate_message(), [(b"x-label", b"cafe")])
    assert trailers.get(b"grpc-status") == b"0"
    assert not [r for r in grpc_records(grpc_log) if r.levelno >= logging.INFO]


async def test_the_server_process_writes_no_error_line_for_it(tmp_path: Path) -> None:
    # As operators run it, at the default INFO level: not even the demoted line is written.
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "--listen", "127.0.0.1:0", stdout=out, stderr=out, cwd=ROOT
        )
    try:
        address = ""
        async with asyncio.timeout(30):
            while not (found := re.search(r"listening on (\S+);", log.read_text(errors="replace"))):
                assert proc.returncode is None, log.read_text(errors="replace")
                await asyncio.sleep(0.05)
            address = found.group(1)
        trailers = await raw_grpc_call(address, GENERATE, generate_message(), [(b"x-label", NOT_UTF8)])
    finally:
        proc.terminate()
        async with asyncio.timeout(15):
            await proc.wait()
    text = log.read_text(errors="replace")
    assert trailers.get(b"grpc-status") == b"0"
    assert "outcome=OK" in text and " ERROR " not in text and "Invalid encoding" not in text, text
