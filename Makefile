# Set-up and the two everyday commands. Works on a fresh machine with python3 (>= 3.10) and pip.
#   make demo   creates .venv, installs torch==2.13.0 then the package, segments a fresh sample
#   make test   creates .venv, installs the package with its test extras, runs the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. On a CUDA machine pip's
# default index gives the CUDA build of this same version; set TORCH_INDEX to choose another.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?=

.PHONY: demo test venv clean brain-model contrast-encoder

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev,slicer-test,fed]"
	touch $@

venv: $(VENV)/.base

# The set-up step fetches the real sample scan (the ITK example T1) from Debian's package index once.
demo: $(VENV)/.base
	$(PY) -m uharmony.data.sources itk-examples
	$(VENV)/bin/uharmony demo --out demo_out

# Rebuild the default brain model (about 4.5 h on 2 CPU cores; never in CI). See docs/model.md.
brain-model: $(VENV)/.base
	$(PY) -m uharmony.train.brain data --out work/heads
	$(PY) -m uharmony.train.brain train --data work/heads --out work/brain
	$(PY) -m uharmony.train.brain finish --model work/brain --data work/heads --install

# Rebuild the shipped contrast encoders of the default gate shape (about 45 min on 2 CPU cores) and the
# benchmark's gate (10-17 min); never in CI. Delete a file there to rebuild it. See docs/federation.md.
contrast-encoder: $(VENV)/.base
	$(PY) -m uharmony.train.contrast

test: $(VENV)/.test
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q Testing

clean:
	rm -rf $(VENV) demo_out
