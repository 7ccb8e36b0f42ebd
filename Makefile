# Each target sets itself up on first use: a .venv with the pinned torch and the project.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The torch/torchvision pair this project is tested with (pip takes it from PyPI or a local mirror).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# Every other package pinned too, the same pins as the Docker image.
PINS   := docker/constraints.txt

.PHONY: install quickstart test test-fast lint constraints clean image push k8s-manifests cluster-config

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

# --- Deployment (docs/sweeps.md, "Running a sweep" 3-5). One variable names the image: IMAGE,
# made of REGISTRY (e.g. ghcr.io/you) and TAG (the commit). docker/ names it impactx-ray:latest,
# which the two render targets below replace with IMAGE.
REGISTRY ?=
TAG      ?= $(shell git describe --always --dirty 2>/dev/null || echo latest)
IMAGE    ?= $(if $(REGISTRY),$(REGISTRY)/)impactx-ray:$(TAG)
DEPLOY   ?= build/deploy
K8S      := docker/storage.k8s.yaml docker/postgres.k8s.yaml docker/mlflow.k8s.yaml \
            docker/preload.k8s.yaml docker/rayjob.yaml

# The image, tagged IMAGE and impactx-ray:latest (what docker/compose.yaml runs).
image:
	docker build -f docker/Dockerfile -t $(IMAGE) -t impactx-ray:latest .

# Build and push IMAGE. TAG is the commit (`-dirty` with uncommitted changes: commit first, or
# set TAG, so that nodes that cache images by tag never run a stale one).
push:
	@test -n "$(REGISTRY)" || { echo "make push needs REGISTRY=<registry>/<namespace>"; exit 2; }
	$(MAKE) --no-print-directory image IMAGE=$(IMAGE)
	docker push $(IMAGE)

# The Kubernetes manifests with IMAGE in them, in $(DEPLOY)/k8s/ (kubectl apply -f there).
k8s-manifests:
	mkdir -p $(DEPLOY)/k8s
	for f in $(K8S); do sed 's|impactx-ray:latest|$(IMAGE)|g' $$f > $(DEPLOY)/k8s/$${f##*/}; done
	@echo "wrote $(DEPLOY)/k8s/ with image $(IMAGE)"

# The cluster launcher's config with IMAGE, the AMI and the NFS export in it: $(DEPLOY)/cluster.yaml.
cluster-config:
	@test -n "$(AMI)" -a -n "$(SHARED_NFS)" || \
	    { echo "make cluster-config needs AMI=ami-... SHARED_NFS=<nfs-host>:/<path>"; exit 2; }
	mkdir -p $(DEPLOY)
	sed -e 's|impactx-ray:latest|$(IMAGE)|g' -e 's|@AMI@|$(AMI)|g' -e 's|@SHARED_NFS@|$(SHARED_NFS)|g' \
	    docker/cluster.yaml > $(DEPLOY)/cluster.yaml
	@echo "wrote $(DEPLOY)/cluster.yaml with image $(IMAGE)"
