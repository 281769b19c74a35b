// The Go client generated from protos/ alone (clients/go, `make clients`), against a live server
// whose address is in TOKENWIRE_TARGET (tests/test_go_client.py starts it and runs `go test`).
package live

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	tokenwirev1 "github.com/tokenwire/tokenwire/clients/go/tokenwire/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

func client(t *testing.T) tokenwirev1.GenerationServiceClient {
	t.Helper()
	target := os.Getenv("TOKENWIRE_TARGET")
	if target == "" {
		t.Fatal("TOKENWIRE_TARGET is not set")
	}
	// grpc 1.33 (Debian's) predates credentials/insecure: WithInsecure is its plaintext option.
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return tokenwirev1.NewGenerationServiceClient(conn)
}

func request(model string, durable bool) *tokenwirev1.GenerateRequest {
	seed := int64(0)
	req := &tokenwirev1.GenerateRequest{
		Model:    model,
		Messages: []*tokenwirev1.Message{{Role: tokenwirev1.Role_ROLE_USER, Text: "Tell me about streaming."}},
		Seed:     &seed,
	}
	if durable {
		req.ResumeWindow = durationpb.New(60 * time.Second)
	}
	return req
}

type stream interface {
	Recv() (*tokenwirev1.GenerateResponse, error)
}

// readAll reads a stream to its end: its messages and the status error (nil after OK).
func readAll(t *testing.T, s stream, after uint64) ([]*tokenwirev1.GenerateResponse, error) {
	t.Helper()
	var msgs []*tokenwirev1.GenerateResponse
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return msgs, nil
		}
		if err != nil {
			return msgs, err
		}
		// The contract: sequences grow by exactly 1, from the cursor (1 on Start).
		if want := after + uint64(len(msgs)) + 1; m.GetSequence() != want {
			t.Fatalf("sequence %d, want %d", m.GetSequence(), want)
		}
		msgs = append(msgs, m)
	}
}

func text(msgs []*tokenwirev1.GenerateResponse) string {
	var b strings.Builder
	for _, m := range msgs {
		b.WriteString(m.GetTextDelta().GetText())
	}
	return b.String()
}

func TestStreamReadsToItsFinish(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	max := int32(5)
	req := request("sim", false)
	req.MaxOutputTokens = &max
	s, err := client(t).Generate(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := readAll(t, s, 0)
	if err != nil {
		t.Fatalf("status %v", err)
	}
	if msgs[0].GetStart().GetProvider() != "simulated" {
		t.Fatalf("first message is not Start: %v", msgs[0])
	}
	finish := msgs[len(msgs)-1].GetFinish()
	if finish.GetReason() != tokenwirev1.FinishReason_FINISH_REASON_LENGTH || finish.GetUsage().GetOutputTokens() != 5 {
		t.Fatalf("last message is not the expected Finish: %v", msgs[len(msgs)-1])
	}
	for _, m := range msgs[1 : len(msgs)-1] {
		if m.GetTextDelta() == nil {
			t.Fatalf("not a text delta: %v", m)
		}
	}
}

// errorInfo returns the status's ErrorInfo and RetryInfo details (nil when absent).
func details(err error) (*errdetails.ErrorInfo, *errdetails.RetryInfo) {
	var info *errdetails.ErrorInfo
	var retry *errdetails.RetryInfo
	for _, d := range status.Convert(err).Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			info = d
		case *errdetails.RetryInfo:
			retry = d
		}
	}
	return info, retry
}

func TestRejectedStartIsAStatusWithRichDetails(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := client(t).Generate(ctx, request("rate-limited", false))
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := readAll(t, s, 0)
	if len(msgs) != 0 || status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("%d messages, status %v", len(msgs), err)
	}
	info, retry := details(err)
	if info.GetReason() != "PROVIDER_RATE_LIMITED" || retry.GetRetryDelay().AsDuration() != time.Second {
		t.Fatalf("details: %v %v", info, retry)
	}
}

func TestFailureAfterStartIsAnErrorEventThenTheStatus(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := client(t).Generate(ctx, request("error-after-3", false))
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := readAll(t, s, 0)
	last := msgs[len(msgs)-1].GetError()
	if last.GetCode() != tokenwirev1.ErrorCode_ERROR_CODE_PROVIDER_UNAVAILABLE || !last.GetRetryable() {
		t.Fatalf("last message is not the expected Error: %v", msgs[len(msgs)-1])
	}
	if last.GetLastSequence() != uint64(len(msgs)-1) || status.Code(err) != codes.Unavailable {
		t.Fatalf("last_sequence %d of %d messages, status %v", last.GetLastSequence(), len(msgs), err)
	}
	if info, _ := details(err); info.GetReason() != "PROVIDER_UNAVAILABLE" {
		t.Fatalf("ErrorInfo %v", info)
	}
}

func TestBrokenDurableStreamResumesFromItsLastSequence(t *testing.T) {
	c := client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	unbroken, err := c.Generate(ctx, request("paced", false))
	if err != nil {
		t.Fatal(err)
	}
	want, err := readAll(t, unbroken, 0)
	if err != nil {
		t.Fatal(err)
	}

	// A durable stream whose call breaks after a few messages: its generation goes on.
	callCtx, breakCall := context.WithCancel(ctx)
	s, err := c.Generate(callCtx, request("paced", true))
	if err != nil {
		t.Fatal(err)
	}
	var first []*tokenwirev1.GenerateResponse
	for len(first) < 6 {
		m, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		first = append(first, m)
	}
	breakCall()
	if _, err := s.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("the broken call ended with %v", err)
	}
	start, last := first[0].GetStart(), first[len(first)-1].GetSequence()

	r, err := c.Resume(ctx, &tokenwirev1.ResumeRequest{
		StreamId: start.GetStreamId(), ResumeToken: start.GetResumeToken(), AfterSequence: last,
	})
	if err != nil {
		t.Fatal(err)
	}
	rest, err := readAll(t, r, last)
	if err != nil {
		t.Fatalf("resume status %v", err)
	}
	if rest[len(rest)-1].GetFinish() == nil {
		t.Fatalf("the resumed stream did not end with Finish: %v", rest[len(rest)-1])
	}
	if got := text(append(first, rest...)); got != text(want) || len(got) == 0 {
		t.Fatalf("resumed text differs:\n%q\n%q", got, text(want))
	}
}

func TestCancelStopsADurableStream(t *testing.T) {
	c := client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := c.Generate(ctx, request("paced", true))
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	start := m.GetStart()
	resp, err := c.Cancel(ctx, &tokenwirev1.CancelRequest{StreamId: start.GetStreamId(), ResumeToken: start.GetResumeToken()})
	if err != nil || resp.GetState().GetStatus() != tokenwirev1.StreamStatus_STREAM_STATUS_CANCELLED {
		t.Fatalf("cancel: %v %v", resp, err)
	}
	// Every reader sees the stream end: this call too, with the one terminal Error and its status.
	rest, err := readAll(t, s, 1)
	if rest[len(rest)-1].GetError().GetCode() != tokenwirev1.ErrorCode_ERROR_CODE_STREAM_CANCELLED {
		t.Fatalf("last message is not the cancel's Error: %v", rest[len(rest)-1])
	}
	if status.Code(err) != codes.Canceled {
		t.Fatalf("status %v", err)
	}
	// Idempotent: a second Cancel changes nothing.
	again, err := c.Cancel(ctx, &tokenwirev1.CancelRequest{StreamId: start.GetStreamId(), ResumeToken: start.GetResumeToken()})
	if err != nil || again.GetState().GetLastSequence() != rest[len(rest)-1].GetSequence() {
		t.Fatalf("second cancel: %v %v", again, err)
	}
}
