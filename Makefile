# kiln: the README's two commands are `make serve` (main job) and `make test`.
# Everything kiln needs from outside is fetched by `make setup` into $(KILN_CACHE)
# (default ~/.cache/kiln), pinned and sha256-checked; a complete cache is reused offline.

CARGO ?= cargo
PYTHON ?= python3
PROMPT ?= Once upon a time
TOKENS ?= 48
VENV := .venv
KILN := target/release/kiln

.PHONY: setup test demo serve export check bench bench-speculative test-gpu lint build

# Fetch the ONNX Runtime library, the default model and the corpus; make the Python venv
# the tests use (onnx checker, ONNX Runtime's Python API, tokenizers).
setup: $(VENV)/.ready
	$(PYTHON) scripts/fetch.py

$(VENV)/.ready: tests/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		--only-binary=:all: -r tests/python/requirements.txt
	touch $@

build:
	$(CARGO) build --release

# The full test suite. Model tests run in release (one build profile for everything).
test: setup
	$(CARGO) test --release

# Every recipe in export/ → export/out/NAME (up-to-date artifacts are skipped).
export: setup build
	$(KILN) export export/*.toml

# Prove every artifact `make export` built (tract parity, quality vs FP32, weight integrity).
check: export
	$(KILN) check export/out/*/

# The parity suite on CUDA and TensorRT against the tract reference. A provider whose
# libraries are missing prints `SKIPPED: <reason>`; see the README for what to install.
test-gpu: export
	$(KILN) check --skip-unavailable --ep cuda export/out/*/
	$(KILN) check --skip-unavailable --ep tensorrt export/out/*/

# Main job: export the default model to INT4 (skipped when up to date) and stream a greedy
# generation from it through ONNX Runtime's serving graph.
demo: setup build
	$(KILN) export export/int4.toml
	$(KILN) generate export/out/int4 --prompt "$(PROMPT)" -n $(TOKENS)

# The gRPC service on the default model (export skipped when up to date): proto/kiln/v1,
# health, reflection; the OpenAI-compatible HTTP API on HTTP_ADDR; Prometheus metrics on
# METRICS_ADDR. SIGTERM/SIGINT drain and exit.
ADDR ?= 127.0.0.1:50051
HTTP_ADDR ?= 127.0.0.1:8080
METRICS_ADDR ?= 127.0.0.1:9090
serve: setup build
	$(KILN) export export/int4.toml
	$(KILN) serve export/out/int4 --addr $(ADDR) --http-addr $(HTTP_ADDR) --metrics-addr $(METRICS_ADDR)

# The precision comparison: size, memory, TTFT, prefill, decode at short and 1024 context,
# aggregate throughput of 1/4/8/16 streams.
bench: export
	$(KILN) bench export/out/fp32 export/out/int8 export/out/int4 export/out/int4-g64-sym

# Speculative decoding of the FP32 target: every drafter at K = 1, 2, 4, 8, 16 on open-ended
# and on grounded prompts, with the speedup the acceptance rate predicts, and a plot of each
# (speculative.svg, speculative-grounded.svg).
bench-speculative: export
	$(KILN) bench --speculative export/out/fp32 --draft export/out/int8 --draft export/out/int4-gptq \
		--draft export/out/int4 --draft export/out/draft-l20 --threads 2 --plot speculative.svg

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings
