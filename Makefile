# visattn: `make run` starts the dashboard, `make test` runs the test suite.
# `VISATTN_PUBLIC=1 make run`: public mode (no training, no server paths, slow methods queued).
# `make serve REPLICAS=N PORT=P`: N dashboard processes behind nginx (deploy/serve.py).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= localhost
PORT ?= 8501
REPLICAS ?= 2

.PHONY: run serve test bench train-default train-flagship compare clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m streamlit run dashboard.py --server.address $(HOST) --server.port $(PORT)

serve: $(STAMP)
	$(PY) deploy/serve.py --replicas $(REPLICAS) --port $(PORT) --host $(HOST)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

bench: $(STAMP)
	$(PY) -m benchmarks.run

train-default: $(STAMP)
	$(PY) -m visattn train --model sa_cnn --set "widths=(64,256,256)" --epochs 20 --out checkpoints/sa_cnn.safetensors

# The flagship: three attention blocks (one on the 16×16 grid, two on the 8×8 grid) and
# airbench's lookahead; alternating flips, label smoothing 0.2. On this project's shared 2-core CPU
# (no bf16) one epoch was all that fitted; on a faster machine raise FLAGSHIP_EPOCHS.
FLAGSHIP = --model sa_cnn --set "widths=(64,256,256)" --set "attn_stages=(0,1,1)" --lookahead 0.95 --seed 0
FLAGSHIP_EPOCHS ?= 1
train-flagship: $(STAMP)
	$(PY) -m visattn train $(FLAGSHIP) --epochs $(FLAGSHIP_EPOCHS) --out runs/flagship.safetensors

# Fair comparison (issue 14): one recipe, one schedule, the same widths, attention swapped.
# Not run yet (hours on this CPU); each run resumes with --resume after a stop.
COMPARE_EPOCHS ?= 20
RECIPE = --lookahead 0.95 --seed 0 --epochs $(COMPARE_EPOCHS)
compare: $(STAMP)
	$(PY) -m visattn train --model sa_cnn --set "widths=(64,256,256)" --set "attn_stages=()" $(RECIPE) --out runs/compare/none.safetensors
	$(PY) -m visattn train --model cbam_cnn --set "widths=(64,256,256)" $(RECIPE) --out runs/compare/cbam_cnn.safetensors
	$(PY) -m visattn train --model sa_cnn --set "widths=(64,256,256)" $(RECIPE) --out runs/compare/sa_cnn_1block.safetensors
	$(PY) -m visattn train $(FLAGSHIP) --epochs $(COMPARE_EPOCHS) --out runs/compare/sa_cnn_flagship.safetensors
	$(PY) -m visattn train --model hybrid_vit --optimizer adamw --lr 0.002 --weight-decay 0.05 $(RECIPE) --out runs/compare/hybrid_vit.safetensors

clean:
	rm -rf $(VENV) .pytest_cache
