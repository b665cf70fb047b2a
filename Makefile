PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint fuzz clean browser

# setup.py compiles kvm/, host/ and audit/ with mypyc, and trace/_unhex.c: an edit there is built again here
# (until then kvmpfn runs the Python sources, kvmpfn/native.py). The build backend's UserWarning is hidden: an editable
# install with extensions warns, in a box, that a folder named kvmpfn in the working directory could shadow it.
$(STAMP): pyproject.toml setup.py $(wildcard kvmpfn/kvm/*.py kvmpfn/host/*.py kvmpfn/audit/*.py kvmpfn/trace/*.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "installing kvmpfn; mypyc compiles the simulator (about a minute)"
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The HTML report's browser test needs Debian's chromium: installed here when missing and we are root with apt;
# elsewhere the test is skipped with that reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed and cannot be (not root, or no apt): the browser test will skip"

test: $(STAMP) browser
	$(BIN)/pytest -q -n auto

demo: $(STAMP)
	$(BIN)/kvmpfn audit traces/
	@echo
	@echo "Each trace above was replayed through the simulated 2008 KVM MMU and audited. PASS means its findings"
	@echo "are exactly those traces/kvmpfn-baseline.json expects: most traces must be clean, a few (recorded"
	@echo "real-world traces, deliberate defects) expect the findings listed. Next, try:"
	@echo "  $(BIN)/kvmpfn replay traces/findings/refcount-leak.jsonl --bug same-pfn-no-release"
	@echo "      a leaked frame reference, and the line and kernel function that took it"
	@echo "  $(BIN)/kvmpfn explain traces/findings/refcount-leak.jsonl --finding 1 --bug same-pfn-no-release"
	@echo "      that frame's history, event by event, and the step where the invariant first broke"
	@echo "  $(BIN)/kvmpfn mutants traces/ --jobs 2"
	@echo "      which of those bugs this corpus catches"

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check kvmpfn tests bench
	$(BIN)/ruff format --check kvmpfn tests bench
	$(BIN)/mypy

fuzz: $(STAMP)
	$(BIN)/pytest -q -m fuzz -n auto --dist worksteal

clean:
	rm -rf $(VENV) build *.egg-info *.so kvmpfn/*/*.so kvmpfn/_compiled_sources.py .pytest_cache .hypothesis .ruff_cache .mypy_cache bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
