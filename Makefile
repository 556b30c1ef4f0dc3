# Two commands do everything: `make demo` (all notebooks on the phantom) and `make test`.
# Each creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PRESET ?= demo
# Waiting OpenMP threads sleep rather than spin: much faster on a small or shared CPU.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

.PHONY: demo kermany test lab smoke lint clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev,widgets]"
	touch $(STAMP)

demo: $(STAMP)  ## run every notebook on the built-in phantom (laptop CPU)
	$(PY) -m cxrlib.pipeline --preset $(PRESET)

kermany: $(STAMP)  ## every notebook on Kermany's real chest X-rays, unpacked into data/chest_xray (CPU)
	$(PY) -m cxrlib.pipeline --preset kermany

test: $(STAMP)  ## run the test suite (CPU)
	$(PY) -m pytest -q

smoke: $(STAMP)  ## the whole pipeline on a tiny phantom, in about a minute
	$(PY) -m cxrlib.pipeline --preset smoke

lab: $(STAMP)  ## JupyterLab on notebooks/, after listing what the demo run has done (LAB_ARGS: more flags)
	$(PY) -m cxrlib.pipeline --lab $(LAB_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-runs:  ## delete executed notebooks, checkpoints and tables of every preset
	rm -rf runs/ figures/*/
