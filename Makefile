PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint fuzz clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The HTML report's browser test needs Debian's chromium: installed here when missing and we are root with apt;
# elsewhere the test is skipped with that reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed and cannot be (not root, or no apt): the browser test will skip"

test: $(STAMP) browser
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/kvmpfn audit traces/

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check kvmpfn tests bench
	$(BIN)/ruff format --check kvmpfn tests bench

fuzz: $(STAMP)
	$(BIN)/pytest -q -m fuzz -n auto --dist worksteal

clean:
	rm -rf $(VENV) build *.egg-info
