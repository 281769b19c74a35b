# tokenwire — `make run` serves, `make test` tests. Both set up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf
PROTOS := $(wildcard protos/tokenwire/v1/*.proto)
ARGS ?=

.PHONY: test-fast help setup run test soak bench bench-quick lint proto proto-check clients clients-check breaking contract-baseline demo clean cluster cluster-down

help:
	@echo "make run          serve on localhost:50051 (built-in simulated model, no API key)"
	@echo "make test         run the test suite"
	@echo "make test-fast    the unit tests alone (framing, parsers, sequencer, validation, config): seconds"
	@echo "make soak         run the long soak tests (about 5 minutes): memory over cancel cycles, stalled readers"
	@echo "make bench        the benchmark rig: direct vs bare forwarder vs tokenwire vs LiteLLM (about 10 minutes)"
	@echo "make bench-quick  the rig in brief, without LiteLLM (about 2 minutes)"
	@echo "make demo         stream an answer from a running server (ARGS='--model sim-error ...')"
	@echo "make cluster      Redis + nginx + 3 replicas on loopback (needs redis-server and nginx); make cluster-down stops it"
	@echo "make lint         ruff, mypy, buf lint + breaking (against protos/baseline.binpb), generated-code drift checks"
	@echo "make contract-baseline  publish the contract: rewrite protos/baseline.binpb (on purpose, then commit it)"
	@echo "make proto        regenerate the Python stubs in clients/tokenwire/v1 from protos/"
	@echo "make clients      regenerate the Go (clients/go) and TypeScript (clients/ts/gen) clients from protos/"

# The server (.) and the client distribution it depends on (clients/), in one resolve: tokenwire-client is on no
# index, so pip takes it from the path given beside it.
$(STAMP): pyproject.toml clients/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e './clients[demo]' -e '.[dev]'
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP) $(NODE_STAMP)

run: $(STAMP)
	$(PY) -m service --config config/tokenwire.toml $(ARGS)

test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest $(ARGS)

# The unit tests alone (no server, no fake, no subprocess), for a quick loop while editing the
# framing, parsers, sequencer, validation, config or error taxonomy: seconds, not minutes.
FAST_TESTS := tests/test_sse.py tests/test_sequencer.py tests/test_provider_parsers.py \
	tests/test_content_parsers.py tests/test_content_validation.py tests/test_config.py \
	tests/test_redact.py tests/test_taxonomy.py
test-fast: $(STAMP)
	$(PY) -m pytest $(FAST_TESTS) $(ARGS)

# The soak tests only; their marker keeps them out of `make test`.
soak: $(STAMP)
	$(PY) -m pytest -m soak -p no:cacheprovider $(ARGS)

# LiteLLM pins an older openai SDK: it gets a virtual environment of its own, used by the rig only.
LITELLM_VENV := bench/.venv-litellm
$(LITELLM_VENV)/.installed:
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LITELLM_VENV)/bin/python -m pip install --quiet 'litellm[proxy]'
	touch $@

# Results go to bench/results/ (a table on stdout, bench.json, bench.png).
bench: $(STAMP) $(LITELLM_VENV)/.installed
	$(PY) bench/rig.py $(ARGS)

bench-quick: $(STAMP)
	$(PY) bench/rig.py --quick --paths direct,bare,tokenwire,http,durable $(ARGS)

demo: $(STAMP)
	$(PY) -m tokenwire_client $(ARGS)

# Redis, three replicas sharing it as their journal, nginx in front (deploy/cluster.py); it
# prints the addresses and keeps running until `make cluster-down`. Logs are in .cluster/.
cluster: $(STAMP)
	$(PY) deploy/cluster.py up $(ARGS)

cluster-down:
	@if [ -x $(PY) ]; then $(PY) deploy/cluster.py down $(ARGS); else python3 deploy/cluster.py down $(ARGS); fi

lint: $(STAMP) $(NODE_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(BUF) lint
	$(MAKE) --no-print-directory breaking
	$(MAKE) --no-print-directory proto-check
	$(MAKE) --no-print-directory clients-check

# The contract must stay wire- and source-compatible with the published one: protos/baseline.binpb, a buf image
# committed on purpose (`make contract-baseline`) when a contract is published. Comparing with HEAD~1 let a break in
# the first commit of a multi-commit change through; this compares the tip, and every commit that touched protos/
# since the baseline last moved, with the baseline. The baseline itself may only move compatibly: each of its
# committed versions is checked against the one before, so a change cannot re-publish a break to slip it in.
BASELINE := protos/baseline.binpb
breaking: $(NODE_STAMP)
	@echo "buf breaking against the published contract ($(BASELINE))"; $(BUF) breaking --against $(BASELINE)
	@if [ "$$(git rev-parse --is-shallow-repository)" = true ]; then git fetch -q --unshallow 2>/dev/null || true; fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	git diff --quiet HEAD -- $(BASELINE) || cp $(BASELINE) $$tmp/0.binpb; \
	i=1; for sha in $$(git log --format=%H -- $(BASELINE)); do \
		git show $$sha:$(BASELINE) > $$tmp/$$i.binpb 2>/dev/null || rm -f $$tmp/$$i.binpb; i=$$((i + 1)); done; \
	prev=; for n in $$(ls $$tmp | sort -n); do \
		if [ -n "$$prev" ]; then $(BUF) breaking $$tmp/$$prev --against $$tmp/$$n \
			|| { echo "a version of $(BASELINE) breaks the one published before it"; exit 1; }; fi; prev=$$n; done; \
	since=$$(git log -1 --format=%H -- $(BASELINE)); \
	[ -n "$$since" ] || { echo "no committed baseline yet: only the working tree was compared"; exit 0; }; \
	for sha in $$(git rev-list $$since..HEAD -- protos/tokenwire buf.yaml); do \
		$(BUF) breaking ".git#ref=$$sha" --against $(BASELINE) \
			|| { echo "commit $$sha breaks the published contract"; exit 1; }; done; \
	echo "no commit since the baseline breaks it"

# Publishes the contract as it is now: run it on purpose, when a compatible change is released, and commit the image.
contract-baseline: $(NODE_STAMP)
	$(BUF) build --exclude-source-info -o $(BASELINE)

# Python modules, type stubs, and a descriptor set with comments for server reflection.
PROTOC = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos --include_source_info
proto: $(STAMP)
	$(PROTOC) --python_out=clients --grpc_python_out=clients --mypy_out=clients --mypy_grpc_out=clients \
		--descriptor_set_out=clients/tokenwire/v1/generation.binpb $(PROTOS)

# Fails when the committed stubs differ from what the .proto files generate.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir -p $$tmp/tokenwire/v1; \
	$(PROTOC) --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
		--descriptor_set_out=$$tmp/tokenwire/v1/generation.binpb $(PROTOS) >/dev/null; \
	for f in $$(cd $$tmp && find tokenwire -type f); do \
		cmp -s "$$tmp/$$f" "clients/$$f" || { echo "generated stubs are stale: clients/$$f (run 'make proto')"; exit 1; }; \
	done; echo "generated stubs match protos/"

# The Go and TypeScript clients, with buf.gen.yaml's local plugins (Debian's protoc-gen-go and protoc-gen-go-grpc,
# npm's protoc-gen-es), into $(1) + the template's out paths. The TypeScript client also gets google.rpc's error
# details (ErrorInfo, RetryInfo) from the error_details.proto that googleapis-common-protos ships: the contract
# itself imports only well-known types, and Go has them in Debian's genproto.
RPC_PROTO = $$($(PY) -c 'import google.rpc.error_details_pb2 as m, os; print(os.path.dirname(m.__file__))')/error_details.proto
generate-clients = $(BUF) generate -o $(1) && rpc=$$(mktemp -d) && mkdir -p $$rpc/google/rpc && \
	cp "$(RPC_PROTO)" $$rpc/google/rpc/ && $(BUF) generate $$rpc --template clients/ts/buf.gen.rpc.yaml -o $(1); \
	status=$$?; rm -rf "$$rpc"; [ $$status = 0 ]
CLIENT_DIRS = clients/go/tokenwire clients/ts/gen

clients: $(STAMP) $(NODE_STAMP)
	$(call generate-clients,.)

# Fails when the committed clients differ from what the .proto files generate, or one is missing or extra.
clients-check: $(STAMP) $(NODE_STAMP)
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	{ $(call generate-clients,$$tmp); } >/dev/null || exit 1; \
	generated=$$(cd $$tmp && find $(CLIENT_DIRS) -type f | sort); \
	[ "$$generated" = "$$(find $(CLIENT_DIRS) -type f | sort)" ] || { echo "generated clients differ in files:"; \
		diff <(echo "$$generated") <(find $(CLIENT_DIRS) -type f | sort); exit 1; }; \
	for f in $$generated; do \
		cmp -s "$$tmp/$$f" "$$f" || { echo "generated clients are stale: $$f (run 'make clients')"; exit 1; }; \
	done; echo "generated clients match protos/"

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .cluster
