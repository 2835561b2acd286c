# The two set-up commands of README.md:
#   make simulate   install into .venv and run the 10-hospital federation
#   make test       install into .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install simulate test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# No wheel cache: it would keep a second copy of every download on the (shared, small) CI disk.
	$(BIN)/python -m pip install --quiet --no-cache-dir -e '.[gui,test]'
	touch $(STAMP)

install: $(STAMP)

# On the project's machines the development data lies beside the checkout (no download needed).
SHARED_DATA := $(abspath $(wildcard ../shared/data))

simulate: $(STAMP)
	$(if $(SHARED_DATA),HEMAFED_DATA_DIR="$${HEMAFED_DATA_DIR:-$(SHARED_DATA)}") $(BIN)/hemafed simulate $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check core network gui tests bench

test: lint
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
