"""Faults on a real cluster: Redis, nginx and two replica processes on 127.0.0.1 (deploy/cluster.py).

The cluster is started once for the module and torn down at its end (process groups, SIGKILL after
a bound); a test that kills a replica starts it again. The QUALITY.md replica cases: a replica
SIGKILLed mid-stream, one SIGTERMed behind nginx, Redis restarted mid-stream, Cancel sent to a
replica that does not produce the stream, 200 concurrent durable streams across replicas, and the
`make cluster` scripts themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fakes import FakeOpenAI, StreamReply
from google.protobuf import duration_pb2
from redis.asyncio import Redis

from conftest import ErrorInfo, assert_well_formed, collect, detail, read_to_end, request, rich_status
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc
from tokenwire_client import AsyncClient, ProducerLostError, ResumePolicy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
from cluster import Cluster, Replica  # noqa: E402

pytestmark = pytest.mark.timeout(60)

# The Redis journal's lease (3 s) plus two record checks (1 s each), and a margin for a busy machine.
LEASE_BOUND = 3.0 + 2 * 1.0 + 1.5
CANCEL_BUDGET = 0.25
FAKE_KEY_ENV = "CLUSTER_TEST_VENDOR_KEY"
SERVICE = "tokenwire.v1.GenerationService"


class ThreadedFake:
    """A fake OpenAI-compatible vendor on loopback, in a thread of its own: the replicas are other
    processes, and the test's own loops come and go. Its timestamps are time.monotonic(), which is
    one clock for every process on the machine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # Slow enough to be cancelled in the middle: 400 pieces, 20 ms apart.
        self.fake = FakeOpenAI(default=StreamReply(text=[f"w{i} " for i in range(400)], interval=0.02))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedFake:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def _config(path: Path, fake: FakeOpenAI) -> Path:
    path.write_text(
        f"""
[server]
shutdown_grace_seconds = 3.0
log_level = "INFO"

[routes.fast]
provider = "simulated"
model = "sim"
options = {{ first_token_ms = 5, tokens_per_second = 400, answer_tokens = 40 }}

[routes.long]
provider = "simulated"
model = "sim"
options = {{ first_token_ms = 5, tokens_per_second = 50, answer_tokens = 2000 }}

[routes.fake]
provider = "openai-compatible"
model = "gpt-fake"
max_retries = 0
options = {{ base_url = "{fake.base_url}", api_key_env = "{FAKE_KEY_ENV}", read_timeout_seconds = 10.0 }}
"""
    )
    return path


@pytest.fixture(scope="module")
def fake() -> Iterator[ThreadedFake]:
    with ThreadedFake() as threaded:
        yield threaded


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake: ThreadedFake) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("cluster")
    c = Cluster(
        directory,
        replicas=2,
        config=_config(directory / "tokenwire.toml", fake.fake),
        env={FAKE_KEY_ENV: fake.fake.api_key},
        watch_interval=0.2,
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def redis(cluster: Cluster) -> AsyncIterator[Redis]:
    client = Redis.from_url(cluster.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def stub_for(address: str, **options: Any) -> AsyncIterator[pb_grpc.GenerationServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(address, options=list(options.items()))
    try:
        yield pb_grpc.GenerationServiceStub(channel)
    finally:
        await channel.close()


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


def durable(model: str, request_id: str, window: float = 30.0) -> pb.GenerateRequest:
    return request(model, request_id=request_id, resume_window=seconds(window))


async def owner_of(redis: Redis, stream_id: str) -> str:
    owner = await redis.hget(f"tokenwire:{{{stream_id}}}:rec", "owner")
    return owner.decode() if isinstance(owner, bytes) else str(owner or "")


def member_of(cluster: Cluster, replica_id: str) -> Replica:
    for member in cluster.members:
        if member.replica_id() == replica_id:
            return member
    raise AssertionError(f"no replica has id {replica_id}")


def restart(cluster: Cluster, member: Replica) -> None:
    if member.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            member.proc.wait(10)
    cluster.start_replica(member.index)
    cluster.wait_serving(member, 15)


async def read_n(call: Any, n: int) -> list[pb.GenerateResponse]:
    got: list[pb.GenerateResponse] = []
    while len(got) < n:
        message = await call.read()
        assert message is not grpc.aio.EOF
        got.append(message)
    return got


async def extend(got: list[pb.GenerateResponse], messages: AsyncIterator[pb.GenerateResponse]) -> None:
    async for message in messages:
        got.append(message)


async def read_to_eof(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


def contiguous(messages: list[pb.GenerateResponse]) -> None:
    assert [m.sequence for m in messages] == list(range(1, len(messages) + 1))
    assert sum(1 for m in messages if m.WhichOneof("event") in ("finish", "error")) == 1
    assert messages[-1].WhichOneof("event") in ("finish", "error")


async def test_replica_sigkilled_mid_stream(cluster: Cluster, redis: Redis) -> None:
    """Readers elsewhere get PRODUCER_LOST within the lease; the typed client resumes through nginx."""
    async with AsyncClient(cluster.nginx_address, resume_policy=ResumePolicy(max_attempts=8)) as client:
        stream = client.generate("long", [{"role": "user", "content": "hello"}], durable=True, timeout=40)
        async with stream:
            messages = stream.raw_messages
            got = [await anext(messages) for _ in range(5)]
            stream_id, token = got[0].start.stream_id, got[0].start.resume_token
            owner = member_of(cluster, await owner_of(redis, stream_id))
            other = next(m for m in cluster.members if m is not owner)
            async with stub_for(other.address) as elsewhere, stub_for(cluster.nginx_address) as through_nginx:
                reader = elsewhere.Resume(pb.ResumeRequest(stream_id=stream_id, resume_token=token, after_sequence=5))
                seen_elsewhere = await read_n(reader, 1)
                # A raw call through nginx whose stream the victim serves: what a plain client sees.
                raw = through_nginx.Resume(pb.ResumeRequest(stream_id=stream_id, resume_token=token, after_sequence=0))
                await read_n(raw, 1)
                owner.signal(signal.SIGKILL)
                killed_at = time.monotonic()
                rest, code, trailing = await asyncio.wait_for(read_to_end(reader, seen_elsewhere), LEASE_BOUND + 5)
                noticed = time.monotonic() - killed_at
                assert rest[-1].error.code == pb.ERROR_CODE_PRODUCER_LOST and rest[-1].error.retryable
                assert rest[-1].error.last_sequence == rest[-1].sequence - 1
                assert code == grpc.StatusCode.UNAVAILABLE
                assert detail(rich_status(trailing), ErrorInfo).reason == "PRODUCER_LOST"
                assert noticed < LEASE_BOUND, f"the lost producer was noticed after {noticed:.2f} s"
                print(f"\nPRODUCER_LOST reached a reader on the other replica {noticed:.2f} s after SIGKILL")
                # The raw call went through nginx: either it was on the victim (INTERNAL, RST_STREAM)
                # or on the survivor (the terminal Error, UNAVAILABLE).
                _, raw_code, _ = await asyncio.wait_for(read_to_end(raw), LEASE_BOUND + 5)
                assert raw_code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
            # The typed client: its own call (on the victim, through nginx) broke; it resumes through
            # nginx, lands on the survivor, and reads on to the terminal Error.
            with pytest.raises(ProducerLostError):
                await extend(got, messages)
        contiguous(got)
        assert got[-1].error.code == pb.ERROR_CODE_PRODUCER_LOST
        # The caller's whole stream and the other replica's reader agree, byte for byte.
        assert [m.SerializeToString() for m in got[5:]] == [m.SerializeToString() for m in rest]
    restart(cluster, owner)


async def test_a_raw_call_through_nginx_sees_internal_when_its_replica_dies(cluster: Cluster, redis: Redis) -> None:
    """What a plain gRPC client sees through nginx: INTERNAL (RST_STREAM), not UNAVAILABLE."""
    async with stub_for(cluster.nginx_address) as stub:
        call = stub.Generate(durable("long", "raw-through-nginx"))
        await read_n(call, 3)
        victim = member_of(cluster, await owner_of(redis, "raw-through-nginx"))
        victim.signal(signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await read_to_eof(call)
        assert broken.value.code() == grpc.StatusCode.INTERNAL
        assert "RST_STREAM" in (broken.value.details() or "")
    restart(cluster, victim)


async def test_cancel_sent_to_another_replica_closes_the_upstream_at_once(
    cluster: Cluster, redis: Redis, fake: ThreadedFake
) -> None:
    a, b = cluster.members
    latencies = []
    async with stub_for(a.address) as on_a, stub_for(b.address) as on_b:
        for i in range(10):
            stream_id = f"cancel-elsewhere-{time.time_ns()}-{i}"
            call = on_a.Generate(durable("fake", stream_id))
            head = await read_n(call, 4)
            assert await owner_of(redis, stream_id) == a.replica_id()
            index = len(fake.fake.requests) - 1
            sent = time.monotonic()
            answer = await on_b.Cancel(pb.CancelRequest(stream_id=stream_id, resume_token=head[0].start.resume_token))
            closed = asyncio.run_coroutine_threadsafe(fake.fake.wait_disconnected(index, 2.0), fake.loop).result(3)
            latencies.append(closed - sent)
            assert answer.state.status == pb.STREAM_STATUS_CANCELLED
            rest, code, _ = await read_to_end(call)
            whole = head + rest
            assert_well_formed(whole)
            assert whole[-1].error.code == pb.ERROR_CODE_STREAM_CANCELLED and code == grpc.StatusCode.CANCELLED
    ms = sorted(x * 1000 for x in latencies)
    print(f"\ncross-replica Cancel -> upstream closed: p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms")
    assert max(latencies) < CANCEL_BUDGET


async def test_replica_sigtermed_drains_and_takes_no_new_streams(cluster: Cluster, redis: Redis) -> None:
    addresses = ",".join(m.address for m in cluster.members)
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
    }
    through_nginx_channel = grpc.aio.insecure_channel(cluster.nginx_address)
    through_nginx = pb_grpc.GenerationServiceStub(through_nginx_channel)
    async with stub_for(f"ipv4:{addresses}", **{"grpc.service_config": json.dumps(config)}) as balanced:
        # A long stream through nginx: its replica is the one to drain.
        call = through_nginx.Generate(durable("long", f"drained-{time.time_ns()}"))
        head = await read_n(call, 2)
        draining = member_of(cluster, await owner_of(redis, head[0].start.stream_id))
        draining.signal(signal.SIGTERM)
        # The watcher takes it out of nginx (health NOT_SERVING -> `down`, reload).
        log = cluster.directory / "watcher.log"
        for _ in range(50):
            if draining.address in log.read_text():
                break
            await asyncio.sleep(0.1)
        assert f"down: {draining.address}" in log.read_text()
        drained_id = draining.replica_id()

        async def typed(client: AsyncClient, i: int) -> list[pb.GenerateResponse]:
            async with client.generate("fast", [{"role": "user", "content": "hi"}], durable=True, timeout=20) as stream:
                return [m async for m in stream.raw_messages]

        # New streams: on a new connection through nginx (its reloaded workers no longer pick the
        # draining replica), through client-side round_robin with health checking, and with the
        # typed client on the old nginx connection (whose old worker still may pick it: the
        # refusal, UNAVAILABLE / SERVER_SHUTTING_DOWN, is retried and lands elsewhere). Every one
        # starts, none on the draining replica.
        async with stub_for(cluster.nginx_address) as fresh:
            typed_client = AsyncClient(channel=through_nginx_channel)
            results = await asyncio.gather(
                *(collect(fresh.Generate(durable("fast", f"after-term-nginx-{i}"))) for i in range(12)),
                *(collect(balanced.Generate(durable("fast", f"after-term-rr-{i}"))) for i in range(12)),
            )
            typed_results = await asyncio.gather(*(typed(typed_client, i) for i in range(12)))
        for i, (messages, code, trailing) in enumerate(results):
            path = "nginx" if i < 12 else "round_robin"
            assert code == grpc.StatusCode.OK, (path, code, trailing)
            contiguous(messages)
            assert await owner_of(redis, messages[0].start.stream_id) != drained_id
        for messages in typed_results:
            contiguous(messages)
            assert await owner_of(redis, messages[0].start.stream_id) != drained_id
        # Its stream in flight went on during the drain, then ended per the shutdown rule.
        rest, code, _ = await asyncio.wait_for(read_to_end(call), 10)
        whole = head + rest
        contiguous(whole)
        assert whole[-1].error.code == pb.ERROR_CODE_SERVER_SHUTTING_DOWN and code == grpc.StatusCode.UNAVAILABLE
    await through_nginx_channel.close()
    assert draining.proc is not None and draining.proc.wait(10) == 0
    restart(cluster, draining)
    for _ in range(50):
        if log.read_text().rstrip().endswith("down: none"):
            break
        await asyncio.sleep(0.1)
    assert log.read_text().rstrip().endswith("down: none")


async def test_redis_restarted_mid_stream(cluster: Cluster, redis: Redis) -> None:
    async with stub_for(cluster.nginx_address) as stub:
        ephemeral = stub.Generate(request("long"))
        kept = stub.Generate(durable("long", "through-a-restart"))
        await read_n(ephemeral, 2)
        await read_n(kept, 2)
        before = {m.index: m.replica_id() for m in cluster.members}
        await asyncio.to_thread(cluster.restart_redis, 1.0)
        # Ephemeral streams never touch Redis: this one goes on.
        more = await asyncio.wait_for(read_n(ephemeral, 20), 5)
        assert all(m.WhichOneof("event") == "text_delta" for m in more)
        ephemeral.cancel()
        # The durable one ends clearly (its record went with Redis's data), never hangs.
        started = time.monotonic()
        _, code, trailing = await asyncio.wait_for(read_to_end(kept), 15)
        reason = detail(rich_status(trailing), ErrorInfo).reason
        assert (code, reason) in {
            (grpc.StatusCode.NOT_FOUND, "STREAM_NOT_FOUND"),
            (grpc.StatusCode.UNAVAILABLE, "JOURNAL_UNAVAILABLE"),
            (grpc.StatusCode.UNAVAILABLE, "PRODUCER_LOST"),
        }, (code, reason)
        took = time.monotonic() - started
        print(f"\na durable stream across a Redis restart ended with {code.name}/{reason} in {took:.2f} s")
        # Once Redis is back the replicas find their leases gone and take new ones (new ids), and
        # durable streams work again.
        for _ in range(50):
            if all(m.replica_id() != before[m.index] for m in cluster.members):
                break
            await asyncio.sleep(0.1)
        assert all(m.replica_id() != before[m.index] for m in cluster.members)
        for _ in range(50):
            messages, code, _ = await collect(stub.Generate(durable("fast", f"after-restart-{time.time_ns()}")))
            if code == grpc.StatusCode.OK:
                break
            await asyncio.sleep(0.2)
        assert code == grpc.StatusCode.OK
        contiguous(messages)


async def test_two_hundred_durable_streams_across_replicas(cluster: Cluster, redis: Redis) -> None:
    async with stub_for(cluster.nginx_address) as stub:
        tag = time.time_ns()
        results = await asyncio.gather(
            *(collect(stub.Generate(durable("fast", f"many-{tag}-{i}"))) for i in range(220))
        )
        owners: set[str] = set()
        for messages, code, trailing in results:
            assert code == grpc.StatusCode.OK, (code, rich_status(trailing).message, len(messages))
            contiguous(messages)
            assert messages[-1].WhichOneof("event") == "finish"
            owners.add(await owner_of(redis, messages[0].start.stream_id))
        assert owners == {m.replica_id() for m in cluster.members}
        # Read back from either replica, byte for byte.
        first = results[0][0]
        for member in cluster.members:
            async with stub_for(member.address) as direct:
                again, code, _ = await collect(
                    direct.Resume(pb.ResumeRequest(stream_id=f"many-{tag}-0", resume_token=first[0].start.resume_token))
                )
            assert code == grpc.StatusCode.OK
            assert [m.SerializeToString() for m in again] == [m.SerializeToString() for m in first]


def test_make_cluster_scripts_bring_a_cluster_up_and_down(tmp_path: Path) -> None:
    """`deploy/cluster.py up` / `down` (what `make cluster` / `make cluster-down` run), on free ports."""
    directory = tmp_path / "c"
    up = subprocess.run(
        [
            sys.executable,
            str(ROOT / "deploy" / "cluster.py"),
            "up",
            "--dir",
            str(directory),
            "--replicas",
            "2",
            "--free-ports",
        ],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    try:
        assert up.returncode == 0, up.stderr
        nginx = next(line.split()[1] for line in up.stdout.splitlines() if line.startswith("nginx"))
        demo = subprocess.run(
            [sys.executable, "-m", "tokenwire_client", "--target", nginx, "--durable", "hi"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert demo.returncode == 0, demo.stderr
        assert "durable stream" in demo.stderr + demo.stdout
        pids = json.loads((directory / "cluster.json").read_text())["procs"]
    finally:
        down = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "cluster.py"), "down", "--dir", str(directory)],
            capture_output=True,
            text=True,
            timeout=40,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    for name, pid in pids.items():
        assert not _running(pid), f"{name} (pid {pid}) outlived `down`"


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's pid 1 may not reap what `up` left behind)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
