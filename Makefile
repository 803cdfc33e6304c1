# visattn: `make run` starts the dashboard, `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= localhost
PORT ?= 8501

.PHONY: run test bench train-default clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m streamlit run dashboard.py --server.address $(HOST) --server.port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run

train-default: $(STAMP)
	$(PY) -m visattn train --model sa_cnn --set "widths=(64,256,256)" --epochs 20 --out checkpoints/sa_cnn.safetensors

clean:
	rm -rf $(VENV) .pytest_cache
