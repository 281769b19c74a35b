"""StreamAccumulator against hand-built messages: the contract's stream rules, no server."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from tokenwire.v1 import generation_pb2 as pb
from tokenwire_client import (
    Finished,
    FinishReason,
    Heartbeat,
    ReasoningBlock,
    ReasoningDelta,
    Started,
    StreamAccumulator,
    StreamIntegrityError,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    TruncatedStreamError,
    UnavailableError,
    UsageSource,
)


def start(sequence: int = 1) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        sequence=sequence,
        start=pb.Start(
            stream_id="stream-1",
            route="sim",
            provider="simulated",
            upstream_model="tokenwire-sim-1",
            create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        ),
    )


def text(sequence: int, piece: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(sequence=sequence, text_delta=pb.TextDelta(text=piece))


def reasoning(sequence: int, piece: str = "", signature: str = "") -> pb.GenerateResponse:
    return pb.GenerateResponse(sequence=sequence, reasoning_delta=pb.ReasoningDelta(text=piece, signature=signature))


def tool(sequence: int, index: int, arguments: str, id: str = "", name: str = "") -> pb.GenerateResponse:
    return pb.GenerateResponse(
        sequence=sequence,
        tool_call_delta=pb.ToolCallDelta(index=index, id=id, name=name, arguments_delta=arguments),
    )


def finish(sequence: int, finish: pb.Finish | None = None) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        sequence=sequence, finish=finish or pb.Finish(reason=pb.FINISH_REASON_STOP, raw_reason="end_turn")
    )


def error(sequence: int, last_sequence: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        sequence=sequence,
        error=pb.Error(
            code=pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED,
            fault=pb.FAULT_PROVIDER,
            grpc_code=grpc.StatusCode.UNAVAILABLE.value[0],
            message="the provider's stream broke",
            retryable=True,
            provider="simulated",
            last_sequence=last_sequence,
        ),
    )


def fed(*messages: pb.GenerateResponse) -> StreamAccumulator:
    accumulator = StreamAccumulator()
    for message in messages:
        accumulator.feed(message)
    return accumulator


def test_events_are_typed_and_text_accumulates() -> None:
    accumulator = StreamAccumulator()
    events = [
        accumulator.feed(message)
        for message in (
            start(),
            text(2, "Hel"),
            pb.GenerateResponse(sequence=3, heartbeat=pb.Heartbeat()),
            text(4, "lo, "),
            text(5, "world"),
            finish(6),
        )
    ]

    assert events[0] == Started(
        1, "stream-1", "sim", "simulated", "tokenwire-sim-1", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    )
    assert events[1:5] == [TextDelta(2, "Hel"), Heartbeat(3), TextDelta(4, "lo, "), TextDelta(5, "world")]
    assert isinstance(events[5], Finished)
    assert accumulator.started == events[0]
    assert accumulator.last_sequence == 6
    accumulator.check_complete()
    response = accumulator.response()
    assert response.text == "Hello, world"
    assert (response.stream_id, response.route, response.provider) == ("stream-1", "sim", "simulated")
    assert response.upstream_model == "tokenwire-sim-1"
    assert response.finish_reason is FinishReason.STOP
    assert response.raw_finish_reason == "end_turn"
    assert response.last_sequence == 6
    assert response.tool_calls == []
    assert response.reasoning == []


def test_gap_in_sequence_is_rejected() -> None:
    accumulator = fed(start(), text(2, "a"))

    with pytest.raises(StreamIntegrityError, match="expected sequence 3, got 4"):
        accumulator.feed(text(4, "lost one"))


def test_duplicate_sequence_is_rejected() -> None:
    accumulator = fed(start(), text(2, "a"))

    with pytest.raises(StreamIntegrityError, match="expected sequence 3, got 2"):
        accumulator.feed(text(2, "a"))


def test_stream_must_open_with_start_at_sequence_1() -> None:
    with pytest.raises(StreamIntegrityError, match="first message must be a Start event, got text_delta"):
        StreamAccumulator().feed(text(1, "no start"))
    with pytest.raises(StreamIntegrityError, match="expected sequence 1, got 0"):
        StreamAccumulator().feed(start(sequence=0))


def test_second_start_is_rejected() -> None:
    accumulator = fed(start(), text(2, "a"))

    with pytest.raises(StreamIntegrityError, match="second Start event at sequence 3"):
        accumulator.feed(start(sequence=3))


@pytest.mark.parametrize("terminal", [finish(3), error(3, last_sequence=2)], ids=["finish", "error"])
def test_message_after_terminal_event_is_rejected(terminal: pb.GenerateResponse) -> None:
    accumulator = fed(start(), text(2, "a"), terminal)

    with pytest.raises(StreamIntegrityError, match="sequence 4 after the terminal event at sequence 3"):
        accumulator.feed(text(4, "late"))


def test_unknown_event_case_is_skipped_but_counted() -> None:
    # A server with a newer contract sends an event case (field 13 here) this client lacks.
    unknown_case = pb.GenerateResponse(sequence=2).SerializeToString() + bytes([13 << 3 | 2, 0])
    future_event = pb.GenerateResponse.FromString(unknown_case)
    accumulator = fed(start())

    assert accumulator.feed(future_event) is None
    assert accumulator.last_sequence == 2
    assert accumulator.feed(text(3, "still in order")) == TextDelta(3, "still in order")
    with pytest.raises(StreamIntegrityError, match="expected sequence 4, got 3"):
        accumulator.feed(text(3, "the unknown event took sequence 2, not this"))


def test_parallel_tool_calls_are_assembled_by_index() -> None:
    accumulator = fed(
        start(),
        tool(2, 0, '{"city": ', id="call_a", name="get_weather"),
        tool(3, 1, "", id="call_b", name="get_time"),
        tool(4, 0, '"Paris"}'),
        tool(5, 1, '{"zone": "CET"}'),
        finish(6, pb.Finish(reason=pb.FINISH_REASON_TOOL_CALLS)),
    )

    response = accumulator.response()
    assert response.tool_calls == [
        ToolCall(0, "call_a", "get_weather", '{"city": "Paris"}'),
        ToolCall(1, "call_b", "get_time", '{"zone": "CET"}'),
    ]
    assert response.tool_calls[0].arguments() == {"city": "Paris"}
    assert response.finish_reason is FinishReason.TOOL_CALLS


def test_tool_call_deltas_are_passed_through_as_events() -> None:
    accumulator = fed(start())

    assert accumulator.feed(tool(2, 3, "{}", id="call_x", name="noop")) == ToolCallDelta(2, 3, "call_x", "noop", "{}")
    assert accumulator.feed(tool(3, 3, " ")) == ToolCallDelta(3, 3, "", "", " ")


def test_tool_call_without_argument_text_has_no_arguments() -> None:
    assert ToolCall(0, "call_a", "ping", "").arguments() == {}


def test_reasoning_blocks_split_after_a_signature() -> None:
    accumulator = fed(
        start(),
        reasoning(2, "Let me "),
        reasoning(3, "think."),
        reasoning(4, signature="sig-1"),
        reasoning(5, signature="sig-1b"),
        reasoning(6, "Again."),
        reasoning(7, signature="sig-2"),
        text(8, "Answer"),
        finish(9),
    )

    response = accumulator.response()
    assert response.reasoning == [ReasoningBlock("Let me think.", "sig-1b"), ReasoningBlock("Again.", "sig-2")]
    assert response.text == "Answer"


def test_reasoning_delta_event_keeps_text_and_signature() -> None:
    accumulator = fed(start())

    assert accumulator.feed(reasoning(2, "hmm", "sig")) == ReasoningDelta(2, "hmm", "sig")


def test_finish_keeps_presence_of_counts_and_timings() -> None:
    accumulator = fed(
        start(),
        finish(
            2,
            pb.Finish(
                reason=pb.FINISH_REASON_STOP_SEQUENCE,
                raw_reason="stop_sequence",
                stop_sequence="END",
                usage=pb.Usage(input_tokens=0, output_tokens=42, source=pb.USAGE_SOURCE_ESTIMATED),
                timing=pb.Timing(total_duration=duration_pb2.Duration(seconds=1, nanos=250_000_000)),
            ),
        ),
    )

    finished = accumulator.finished
    assert finished is not None
    assert finished.reason is FinishReason.STOP_SEQUENCE
    assert finished.stop_sequence == "END"
    usage = finished.usage
    assert usage.input_tokens == 0
    assert usage.output_tokens == 42
    assert usage.cache_read_input_tokens is None
    assert usage.cache_write_input_tokens is None
    assert usage.reasoning_tokens is None
    assert usage.source is UsageSource.ESTIMATED
    assert finished.timing.time_to_first_token is None
    assert finished.timing.output_tokens_per_second is None
    assert finished.timing.total_duration == 1.25


def test_finish_with_all_timings_set() -> None:
    timing = pb.Timing(
        time_to_first_token=duration_pb2.Duration(nanos=120_000_000),
        total_duration=duration_pb2.Duration(seconds=2),
        output_tokens_per_second=0.0,
    )
    finished = fed(start(), finish(2, pb.Finish(reason=pb.FINISH_REASON_LENGTH, timing=timing))).finished

    assert finished is not None
    assert finished.timing.time_to_first_token == 0.12
    assert finished.timing.output_tokens_per_second == 0.0
    assert finished.reason is FinishReason.LENGTH


def test_unknown_enum_values_do_not_crash() -> None:
    future = pb.Finish(
        reason=pb.FinishReason.ValueType(99),
        raw_reason="new_reason",
        usage=pb.Usage(source=pb.UsageSource.ValueType(7)),
    )
    finished = fed(start(), finish(2, future)).finished

    assert finished is not None
    assert finished.reason is FinishReason.OTHER
    assert finished.raw_reason == "new_reason"
    assert finished.usage.source is UsageSource.UNSPECIFIED


def test_stream_that_ends_ok_without_finish_is_truncated() -> None:
    accumulator = fed(start(), text(2, "half an ans"))

    with pytest.raises(TruncatedStreamError, match="after sequence 2 without a Finish or Error"):
        accumulator.check_complete()
    with pytest.raises(RuntimeError, match="not finished"):
        accumulator.response()


def test_call_that_ends_ok_without_any_message_is_truncated() -> None:
    with pytest.raises(TruncatedStreamError, match="without sending any message"):
        StreamAccumulator().check_complete()


def test_error_event_is_not_an_event_but_shapes_the_status_error() -> None:
    accumulator = fed(start(), text(2, "partial"))

    assert accumulator.feed(error(3, last_sequence=2)) is None
    exc = accumulator.status_error(grpc.StatusCode.UNAVAILABLE, "the provider's stream broke", ())
    assert isinstance(exc, UnavailableError)
    assert exc.reason == "PROVIDER_STREAM_TRUNCATED"
    assert exc.retryable is True
    assert exc.provider == "simulated"
    assert exc.stream_id == "stream-1"
    assert exc.last_sequence == 2


def test_error_event_with_ok_status_still_raises_the_error() -> None:
    accumulator = fed(start(), error(2, last_sequence=1))

    with pytest.raises(UnavailableError, match="the provider's stream broke") as raised:
        accumulator.check_complete()
    assert raised.value.last_sequence == 1


def test_status_error_after_start_without_error_event_uses_what_the_client_saw() -> None:
    exc = fed(start(), text(2, "a"), text(3, "b")).status_error(
        grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None
    )

    assert exc.last_sequence == 3
    assert exc.stream_id == "stream-1"


def test_status_error_before_start_has_no_sequence() -> None:
    exc = StreamAccumulator().status_error(grpc.StatusCode.NOT_FOUND, "unknown route 'x'", None)

    assert exc.last_sequence is None
    assert exc.stream_id == ""
