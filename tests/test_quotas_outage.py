"""Quotas in Redis when Redis is gone: they fail open (the default) or closed, as configured."""

from __future__ import annotations

import pytest
from redis_server import running_redis

from service.callers import Caller
from service.errors import ErrorCode, GatewayError
from service.quotas import RedisQuotas

pytestmark = pytest.mark.timeout(30)

LIMITED = Caller(id="team-a", name="team-a", max_concurrent_streams=1, requests_per_minute=100)


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_redis_outage_fails_open_or_closed_as_configured(fail_open: bool) -> None:
    errors: list[int] = []
    with running_redis() as redis:
        quotas = RedisQuotas(redis.url, fail_open=fail_open, on_store_error=lambda: errors.append(1))
        try:
            held = await quotas.acquire(LIMITED)  # Redis up: counted
            with pytest.raises(GatewayError) as over:
                await quotas.acquire(LIMITED)
            assert over.value.code is ErrorCode.QUOTA_EXCEEDED
            held.release()
            redis.stop()
            if fail_open:
                lease = await quotas.acquire(LIMITED)  # let through, uncounted
                lease.release()
            else:
                with pytest.raises(GatewayError) as refused:
                    await quotas.acquire(LIMITED)
                assert refused.value.code is ErrorCode.JOURNAL_UNAVAILABLE and refused.value.retryable
            assert errors, "the store error is counted"
        finally:
            await quotas.aclose()
