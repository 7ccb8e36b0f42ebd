# Each target sets itself up on first use: a .venv with the pinned torch and the project.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The torch/torchvision pair this project is tested with (pip takes it from PyPI or a local mirror).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# Every other package pinned too, the same pins as the Docker image.
PINS   := docker/constraints.txt

.PHONY: install quickstart test test-fast lint constraints clean

install: $(STAMP)

$(STAMP): pyproject.toml $(PINS)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(PINS) $(TORCH)
	$(PY) -m pip install --quiet -c $(PINS) -e '.[test]'
	touch $(STAMP)

# Re-pin after changing a dependency in pyproject.toml: the venv's versions become the pins.
constraints: $(STAMP)
	{ sed -n '1,2p' $(PINS); $(PY) -m pip freeze --exclude-editable | \
	    grep -v -i -E '^(impactx-ray|pip|setuptools|wheel)=='; } > $(PINS).new
	mv $(PINS).new $(PINS)

# IMPACTX end to end on the embedded digits data: stage 1, SHAP maps, stage 2, both accuracies.
quickstart: $(STAMP)
	$(VENV)/bin/impactx run --model lenet5 --dataset digits --batch-size 32 --lr 0.0006 \
	    --val-fraction 0.1 --lambda 0.6 --epochs 20 --max-evals 2000 --out runs/quickstart

# The whole test suite, slow integration tests included.
test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# ruff, configured in pyproject.toml: one line length, import order, pyflakes, bugbear.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
