# kiln: the README's two commands are `make demo` (main job) and `make test`.
# Everything kiln needs from outside is fetched by `make setup` into $(KILN_CACHE)
# (default ~/.cache/kiln), pinned and sha256-checked; a complete cache is reused offline.

CARGO ?= cargo
PYTHON ?= python3
PROMPT ?= Once upon a time
TOKENS ?= 48

.PHONY: setup test demo lint

setup:
	$(PYTHON) scripts/fetch.py

# The full test suite. Model tests run in release (one build profile for everything).
test: setup
	$(CARGO) test --release

# Main job (for now): greedy generation on the default model with the reference backend.
demo: setup
	$(CARGO) run --release --quiet -- generate --backend reference --prompt "$(PROMPT)" -n $(TOKENS)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings
