"""Callers on both doors: keys, routes, quotas, stream ownership, reloads (QUALITY.md's caller cases).

Real servers on 127.0.0.1:0, real gRPC channels and real HTTP requests; the keys file is a real
file the server reads (and reads again). Every case also checks that no key, and no hash of one,
reaches a status, a body, a log line or a metric.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import duration_pb2

from conftest import (
    FAST,
    SLOW,
    ErrorInfo,
    RetryInfo,
    collect,
    detail,
    eventually,
    read_to_end,
    request,
    rich_status,
)
from service.callers import KeyRing, hash_key, main
from tokenwire.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(60)

ROUTES: dict[str, dict[str, Any]] = {
    "sim": {"provider": "simulated", "model": "tokenwire-sim-1", "options": FAST},
    "other": {"provider": "simulated", "model": "tokenwire-sim-1", "options": FAST},
    "slow": {"provider": "simulated", "model": "tokenwire-sim-1", "options": SLOW},
}


class Keys:
    """A keys file and the keys it was made from (the file holds only their hashes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.salt = secrets.token_bytes(16)
        self.keys: dict[str, str] = {}
        self.tables: dict[str, dict[str, Any]] = {}

    def add(self, key_id: str, **spec: Any) -> str:
        key = "sk-tw-" + secrets.token_urlsafe(24)
        self.keys[key_id] = key
        self.tables[key_id] = {"hashes": [hash_key(self.salt, key)], "routes": ["*"]} | spec
        return key

    def revoke(self, key_id: str) -> None:
        del self.tables[key_id]

    def write(self) -> None:
        lines = [f'salt = "{self.salt.hex()}"']
        for key_id, spec in self.tables.items():
            lines.append(f"[keys.{key_id}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in spec.items()]
        self.path.write_text("\n".join(lines) + "\n")

    def secrets(self) -> list[str]:
        """Everything that must never show: the keys and their hashes."""
        hashes = [h.removeprefix("hmac-sha256:") for spec in self.tables.values() for h in spec["hashes"]]
        return [*self.keys.values(), *hashes, self.salt.hex()]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    k = Keys(tmp_path / "keys.toml")
    k.add("alpha", name="alpha")
    k.add("beta", name="beta", routes=["other", "slow"])
    k.add("limited", name="limited", max_concurrent_streams=1)
    k.add("rpm", name="rpm", requests_per_minute=2)
    k.add("tpm", name="tpm", tokens_per_minute=10)
    k.write()
    return k


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def server(start_server: Any, keys: Keys) -> Any:
    return await start_server(
        ROUTES, keys_file=str(keys.path), keys_reload_seconds=0.1, http_listen="127.0.0.1:0", metrics_listen="http"
    )


def http_base(server: Any) -> str:
    return f"http://127.0.0.1:{server.server.http.port}"


def assert_clean(text: str, keys: Keys) -> None:
    for secret in keys.secrets():
        assert secret not in text


async def grpc_code(stub: Any, key: str | None, model: str = "sim", **fields: Any) -> tuple[Any, Any, list[Any]]:
    metadata = bearer(key) if key is not None else ()
    messages, code, trailing = await collect(stub.Generate(request(model, **fields), metadata=metadata))
    return code, trailing, messages


async def test_no_key_wrong_key_and_odd_headers_on_grpc(server: Any, keys: Keys) -> None:
    stub = server.stub
    for metadata in ((), (("authorization", "Bearer sk-tw-not-a-key-at-all"),), (("authorization", "Basic abc"),)):
        call = stub.Generate(request(), metadata=metadata)
        messages, code, trailing = await collect(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED and not messages
        assert detail(rich_status(trailing), ErrorInfo).reason == "UNAUTHENTICATED"
        assert_clean(str(await call.details()) + str(trailing), keys)
    # The scheme in any case is still Bearer; the key twice is refused (which one counts is no guess).
    messages, code, _ = await collect(
        stub.Generate(request(), metadata=(("authorization", "bEaReR " + keys.keys["alpha"]),))
    )
    assert code == grpc.StatusCode.OK and messages[-1].HasField("finish")
    twice = bearer(keys.keys["alpha"]) * 2
    _, code, _ = await collect(stub.Generate(request(), metadata=twice))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListModels(pb.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_no_key_wrong_key_and_odd_headers_on_http(server: Any, keys: Keys) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(http_base(server)) as http:
        for headers in ({}, {"Authorization": "Bearer sk-tw-wrong"}, {"Authorization": "Token x"}):
            async with http.post("/v1/chat/completions", json=body, headers=headers) as r:
                text = await r.text()
                assert r.status == 401, text
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                error = json.loads(text)["error"]
                assert error["type"] == "authentication_error" and error["code"] == "unauthenticated"
                assert_clean(text, keys)
        async with http.get("/v1/models") as r:
            assert r.status == 401
        # The header's name and the scheme in any case.
        headers = {"aUtHoRiZaTiOn": "BEARER " + keys.keys["alpha"]}
        async with http.post("/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
    # The header twice, on the wire as sent (a client library may fold the two into one).
    auth = f"Bearer {keys.keys['alpha']}"
    reader, writer = await asyncio.open_connection("127.0.0.1", server.server.http.port)
    writer.write(
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nauthorization: {auth}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 401")
    writer.close()


async def test_a_key_for_other_routes_is_denied_and_sees_only_its_routes(server: Any, keys: Keys) -> None:
    beta = keys.keys["beta"]
    code, trailing, messages = await grpc_code(server.stub, beta, "sim")
    assert code == grpc.StatusCode.PERMISSION_DENIED and not messages
    assert detail(rich_status(trailing), ErrorInfo).reason == "PERMISSION_DENIED"
    code, _, _ = await grpc_code(server.stub, beta, "other")
    assert code == grpc.StatusCode.OK
    models = await server.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(beta))
    assert [m.name for m in models.models] == ["other", "slow"]
    everything = await server.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(keys.keys["alpha"]))
    assert [m.name for m in everything.models] == ["other", "sim", "slow"]
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(http_base(server), headers={"Authorization": f"Bearer {beta}"}) as http:
        async with http.post("/v1/chat/completions", json=body) as r:
            assert r.status == 403
            assert (await r.json())["error"]["type"] == "permission_error"
        async with http.get("/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["other", "slow"]


async def test_concurrency_quota_on_both_doors(server: Any, keys: Keys) -> None:
    key = keys.keys["limited"]
    held = server.stub.Generate(request("slow"), metadata=bearer(key))
    first = await held.read()
    assert first.HasField("start")
    code, trailing, _ = await grpc_code(server.stub, key)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rich_status(trailing)
    assert detail(status, ErrorInfo).reason == "QUOTA_EXCEEDED"
    assert detail(status, RetryInfo).retry_delay.seconds >= 1
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(http_base(server), headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.post("/v1/chat/completions", json=body) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["code"] == "quota_exceeded"
        held.cancel()
        # The slot comes back when the stream ends.
        await eventually(lambda: server.server.gateway.active_streams == 0)
        async with http.post("/v1/chat/completions", json=body) as r:
            assert r.status == 200


async def test_requests_and_tokens_per_minute(server: Any, keys: Keys) -> None:
    rpm = keys.keys["rpm"]
    for _ in range(2):
        assert (await grpc_code(server.stub, rpm))[0] == grpc.StatusCode.OK
    code, trailing, _ = await grpc_code(server.stub, rpm)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0 < detail(rich_status(trailing), RetryInfo).retry_delay.seconds <= 60
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(http_base(server)) as http:
        async with http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {rpm}"}) as r:
            assert r.status == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
        # Tokens are charged from the usage the stream reported at its end: the first stream
        # (more than 10 tokens) is let in, and the next is refused on both doors.
        tpm = keys.keys["tpm"]
        code, _, messages = await grpc_code(server.stub, tpm)
        usage = messages[-1].finish.usage
        assert code == grpc.StatusCode.OK and usage.input_tokens + usage.output_tokens > 10
        await asyncio.sleep(0)
        assert (await grpc_code(server.stub, tpm))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {tpm}"}) as r:
            assert r.status == 429
        async with http.get("/metrics") as r:
            metrics = await r.text()
    assert 'tokenwire_quota_rejections_total{caller="rpm",quota="requests_per_minute"} 2.0' in metrics
    assert 'tokenwire_quota_rejections_total{caller="tpm",quota="tokens_per_minute"} 2.0' in metrics
    assert_clean(metrics, keys)


def durable(model: str = "slow") -> pb.GenerateRequest:
    return request(model, resume_window=duration_pb2.Duration(seconds=30))


async def test_another_callers_stream_id_and_token_are_not_found(server: Any, keys: Keys) -> None:
    alpha, beta = keys.keys["alpha"], keys.keys["beta"]
    call = server.stub.Generate(durable(), metadata=bearer(alpha))
    start = (await call.read()).start
    stream_id, token = start.stream_id, start.resume_token
    for key in (beta, None):
        metadata = bearer(key) if key else ()
        expected = grpc.StatusCode.NOT_FOUND if key else grpc.StatusCode.UNAUTHENTICATED
        _, code, _ = await collect(
            server.stub.Resume(pb.ResumeRequest(stream_id=stream_id, resume_token=token), metadata=metadata)
        )
        assert code == expected
        for rpc, message in (
            (server.stub.Poll, pb.PollRequest(stream_id=stream_id, resume_token=token)),
            (server.stub.Cancel, pb.CancelRequest(stream_id=stream_id, resume_token=token)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc(message, metadata=metadata)
            assert err.value.code() == expected
    base = f"/v1/streams/{stream_id}"
    async with aiohttp.ClientSession(http_base(server), headers={"Authorization": f"Bearer {beta}"}) as http:
        for method, path in (("GET", base), ("GET", base + "/events"), ("POST", base + "/cancel")):
            async with http.request(method, path, params={"token": token}) as r:
                assert r.status == 404, (method, path)
                assert (await r.json())["error"]["code"] == "stream_not_found"
    # Its owner still reads and cancels it.
    poll = await server.stub.Poll(pb.PollRequest(stream_id=stream_id, resume_token=token), metadata=bearer(alpha))
    assert poll.messages[0].HasField("start")
    cancelled = await server.stub.Cancel(
        pb.CancelRequest(stream_id=stream_id, resume_token=token), metadata=bearer(alpha)
    )
    assert cancelled.state.status == pb.STREAM_STATUS_CANCELLED
    await read_to_end(call)
    # The same request_id from another caller is not the same stream.
    again = request("other", request_id="shared-id-1", resume_window=duration_pb2.Duration(seconds=30))
    _, code, _ = await collect(server.stub.Generate(again, metadata=bearer(alpha)))
    assert code == grpc.StatusCode.OK
    _, code, _ = await collect(server.stub.Generate(again, metadata=bearer(beta)))
    assert code == grpc.StatusCode.ALREADY_EXISTS


async def test_revoked_and_rotated_keys_reload_without_cutting_streams(server: Any, keys: Keys) -> None:
    alpha = keys.keys["alpha"]
    call = server.stub.Generate(request("slow"), metadata=bearer(alpha))
    assert (await call.read()).HasField("start")
    ring: KeyRing = server.server.keys
    reloads = ring.reloads
    keys.revoke("alpha")
    gamma = keys.add("gamma")
    keys.write()
    # The mtime poll picks the change up; SIGHUP's handler (reload) does the same at once.
    await eventually(lambda: ring.reloads > reloads, within=5)
    assert (await grpc_code(server.stub, alpha))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert (await grpc_code(server.stub, gamma))[0] == grpc.StatusCode.OK
    # The stream that started with the revoked key goes on to its end.
    messages, code, _ = await read_to_end(call)
    assert code == grpc.StatusCode.OK and messages[-1].HasField("finish")
    # A file that no longer parses keeps the keys in force.
    keys.path.write_text("salt = 'broken\n")
    assert not ring.reload()
    assert (await grpc_code(server.stub, gamma))[0] == grpc.StatusCode.OK


async def test_auth_off_by_default(running: Any) -> None:
    _, code, _ = await collect(running.stub.Generate(request()))
    assert code == grpc.StatusCode.OK
    assert not running.server.keys.enabled


async def test_no_key_or_hash_in_logs_metrics_or_statuses(
    server: Any, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for key_id in ("alpha", "beta", "limited"):
        await grpc_code(server.stub, keys.keys[key_id], "sim")
    await grpc_code(server.stub, keys.keys["alpha"] + "x", "sim")
    async with aiohttp.ClientSession(http_base(server)) as http, http.get("/metrics") as r:
        metrics = await r.text()
    text = caplog.text + metrics
    assert "caller='alpha'" in caplog.text
    assert_clean(text, keys)


def test_the_key_tools(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["salt"]) == 0
    salt = capsys.readouterr().out.strip()
    assert main(["new-key"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-tw-") and len(key) > 40
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(key + "\n"))
    assert main(["hash", "--salt", salt]) == 0
    assert capsys.readouterr().out.strip() == hash_key(bytes.fromhex(salt), key)
