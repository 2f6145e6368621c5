# Two commands on a fresh machine with Python 3.11:  `make demo`  and  `make test`.
# Each creates .venv and installs the pinned versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-step-cost bench-label-noise label-noise-report bench-transformer transformer-report clean docs wheel-check test-min test-py313 bench-collapse collapse-trace collapse-report typecheck

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/mnist1d_demo.py

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -n 2 --durations=15

bench-step-cost: $(STAMP)
	$(BIN)/python -m benchmarks.step_cost

# The label-noise benchmark (benchmarks/README.md, "Label noise"): parts, each
# its own command, then the pooled reports. Recipe 1 (the default): six parts
# without reuse, then the reuse kinds at p = 0.2, 0.25 and 0.5; recipe 2 (--val-size 600
# --epochs 115: another split, 2,990 steps): SGD, SAM and LookSAM.
LABEL_NOISE := $(BIN)/python -m benchmarks.label_noise --workers 2
LN_RESULTS := benchmarks/results
LN_WIDE := 0.05,0.1,0.2,0.3,0.4,0.6,0.8
LN_REUSE := $(LABEL_NOISE) --no-baselines --p 0.2
LN_RECIPE2 := $(LABEL_NOISE) --p 0.2 --kinds looksam --alphas 0.5 --val-size 600 --epochs 115
LN_PARTS := 20_p050 40_p050 p020 clean p025 upper reuse_20_p020 reuse_20_p020_low reuse_20_p020_r01 reuse_40_p020 reuse_40_p020_r01 reuse_clean_p020 reuse_p025 reuse_clean_p025 reuse_p050
LN_PARTS2 := recipe2_20 recipe2_20_r06 recipe2_40 recipe2_40_r01 recipe2_clean recipe2_clean_rst
comma := ,
bench-label-noise: $(STAMP)
	$(LABEL_NOISE) --noise 0.2 --p 0.5 --name label_noise_20_p050
	$(LABEL_NOISE) --noise 0.4 --p 0.5 --name label_noise_40_p050
	$(LABEL_NOISE) --noise 0.2,0.4 --p 0.2 --kinds rst,grst,every_k_lam --rhos $(LN_WIDE),1.0 --no-baselines --name label_noise_p020
	$(LABEL_NOISE) --noise 0 --p 0.5,0.2 --kinds rst,grst,every_k_lam --rhos $(LN_WIDE) --name label_noise_clean
	$(LABEL_NOISE) --noise 0.2,0.4 --p 0.25 --no-baselines --name label_noise_p025
	$(LABEL_NOISE) --noise 0.2,0.4 --p 0.5,0.25 --kinds rst,linear --rhos 0.8,1.0 --no-baselines --flat-top 0 --name label_noise_upper
	$(LN_REUSE) --noise 0.2 --kinds reuse,reuse_fresh,looksam --alphas 0.5,0.7,1.0 --rhos 0.2,0.3,0.4,0.6 --name label_noise_reuse_20_p020
	$(LN_REUSE) --noise 0.2 --kinds reuse,reuse_fresh,looksam --alphas 0.2,0.3 --rhos 0.1,0.2,0.3,0.4 --name label_noise_reuse_20_p020_low
	$(LN_REUSE) --noise 0.2 --kinds reuse,reuse_fresh,looksam --alphas 0.5 --rhos 0.1 --name label_noise_reuse_20_p020_r01
	$(LN_REUSE) --noise 0.4 --kinds looksam,reuse_fresh --alphas 0.5 --rhos 0.2,0.3,0.4 --name label_noise_reuse_40_p020
	$(LN_REUSE) --noise 0.4 --kinds looksam --alphas 0.5 --rhos 0.1 --name label_noise_reuse_40_p020_r01
	$(LN_REUSE) --noise 0 --kinds looksam,reuse_fresh --alphas 0.5 --rhos 0.05,0.1,0.2 --name label_noise_reuse_clean_p020
	$(LABEL_NOISE) --no-baselines --p 0.25 --noise 0.2,0.4 --kinds reuse,looksam --alphas 0.5 --rhos 0.2,0.3,0.4 --name label_noise_reuse_p025
	$(LABEL_NOISE) --no-baselines --p 0.25 --noise 0 --kinds reuse,looksam --alphas 0.5 --rhos 0.05,0.1,0.2 --name label_noise_reuse_clean_p025
	$(LABEL_NOISE) --no-baselines --p 0.5 --noise 0.2,0.4 --kinds reuse,looksam --alphas 0.5 --rhos 0.2,0.3,0.4 --name label_noise_reuse_p050
	$(LN_RECIPE2) --noise 0.2 --rhos 0.1,0.2,0.3,0.4 --name label_noise_recipe2_20
	$(LN_RECIPE2) --noise 0.2 --rhos 0.6 --name label_noise_recipe2_20_r06
	$(LN_RECIPE2) --noise 0.4 --rhos 0.2,0.3,0.4 --name label_noise_recipe2_40
	$(LN_RECIPE2) --noise 0.4 --rhos 0.1 --flat-top 0 --name label_noise_recipe2_40_r01
	$(LN_RECIPE2) --noise 0 --rhos 0.05,0.1,0.2 --name label_noise_recipe2_clean
	$(LABEL_NOISE) --p 0.2 --kinds rst --val-size 600 --epochs 115 --noise 0 --rhos 0.2,0.4 --no-baselines --flat-top 0 --name label_noise_recipe2_clean_rst
	$(MAKE) label-noise-report

# The pooled reports alone, from the parts' JSON files (seconds): the
# figures and the full tables, benchmarks/results/label_noise*.md.
label-noise-report: $(STAMP)
	$(LABEL_NOISE) --name label_noise --from-json $(subst $(eval) ,$(comma),$(foreach p,$(LN_PARTS),$(LN_RESULTS)/label_noise_$(p).json))
	$(LABEL_NOISE) --name label_noise_recipe2 --from-json $(subst $(eval) ,$(comma),$(foreach p,$(LN_PARTS2),$(LN_RESULTS)/label_noise_$(p).json))
	$(LABEL_NOISE) --recipes $(LN_RESULTS)/label_noise.json,$(LN_RESULTS)/label_noise_recipe2.json

# The transformer on MNIST-1D (benchmarks/results/transformer.md): a pre-LN
# transformer trained with AdamW (warmup-cosine), 30 epochs (810 steps). The
# parts in order: the base-recipe tuning (lr at weight decay 0.05, AdamW and
# SAM at rho 0.2, 2 seeds); SAM's wide radius scan (2 seeds); 20% noise, 8
# seeds (seeds 0-2, then 3-7 with --seed-list; pooled by --from-json) at 0.6x
# SAM's passes (p = 0.2: RST, LookSAM, the coin with the window, SAM short,
# AdamW long) and at 0.75x (p = 0.5: the quick start, SAM short, AdamW long);
# 40% noise and clean labels, 8 seeds. Wall times: 2 cores, two parts at once
# (load 4-5, nice 5) from the rho scan on; the first five parts at load 10-20.
TRANSFORMER := JAX_COMPILATION_CACHE_DIR=runs/jax_cache $(BIN)/python -m benchmarks.label_noise --model transformer --epochs 30 --no-flatness --workers 1
LABEL_NOISE_1 := $(BIN)/python -m benchmarks.label_noise --no-flatness --workers 1
TF_TUNE := $(TRANSFORMER) --seeds 2 --noise 0.2 --kinds '' --rhos 0.2 --weight-decay 0.05
TF_RECIPE := $(TRANSFORMER) --lr 4e-3 --weight-decay 0.05
TF_20 := $(TF_RECIPE) --seeds 3 --noise 0.2 --rhos 0.05,0.1 --alphas 0.25
TF_20_37 := $(TF_20) --seed-list 3,4,5,6,7
bench-transformer: $(STAMP)
	$(TF_TUNE) --lr 2e-3 --name transformer_tune_lr2e-3_wd0.05  # 13.5 min (stopped in its flatness stage; runs kept)
	$(TF_TUNE) --lr 4e-3 --name transformer_tune_lr4e-3_wd0.05  # 7.6 min
	$(TF_RECIPE) --seeds 2 --noise 0.4,0.2,0 --kinds '' --rhos 0.01,0.02,0.2,0.5,1.0 --name transformer_rho_scan  # 11.4 min
	$(TF_20) --p 0.2 --kinds rst,looksam,reuse_fresh,sam_short,base_long --name transformer_20_p020  # 38.4 min
	$(TF_20) --p 0.5 --kinds every_k_lam,sam_short,base_long --no-baselines --name transformer_20_p050  # 19.0 min
	$(TF_20) --p 0.2 --kinds looksam,reuse_fresh --alphas 0.5 --no-baselines --name transformer_20_p020_a05  # 7.2 min
	$(TF_20_37) --p 0.2 --kinds rst,looksam,reuse_fresh,sam_short,base_long --name transformer_20_p020_s37  # 15.3 min
	$(TF_20_37) --p 0.5 --kinds every_k_lam,sam_short,base_long --no-baselines --name transformer_20_p050_s37  # 6.9 min
	$(TF_20_37) --p 0.2 --kinds looksam,reuse_fresh --alphas 0.5 --no-baselines --name transformer_20_p020_a05_s37  # 5.2 min
	$(TF_RECIPE) --seeds 8 --noise 0.2 --rhos 0.05,0.1 --alphas 0.1 --p 0.2 --kinds looksam,reuse_fresh --no-baselines --name transformer_20_p020_a01_8  # 7.9 min
	$(TF_RECIPE) --seeds 8 --noise 0.4 --rhos 0.05,0.1,0.2 --alphas 0.1,0.25,0.5 --p 0.2 --kinds rst,looksam,reuse_fresh,sam_short,base_long --name transformer_40_p020_8  # 58.6 min
	$(TF_RECIPE) --seeds 8 --noise 0.4 --rhos 0.05,0.1,0.2 --p 0.5 --kinds every_k_lam,sam_short,base_long --no-baselines --name transformer_40_p050_8  # 15.6 min
	$(TF_RECIPE) --seeds 8 --noise 0 --rhos 0.02,0.05,0.1 --p 0.5 --kinds every_k_lam,sam_short,base_long --name transformer_clean_p050_8  # 28.4 min
	$(TF_RECIPE) --seeds 8 --noise 0 --rhos 0.02,0.05,0.1 --alphas 0.25 --p 0.2 --kinds rst,looksam,reuse_fresh,sam_short,base_long --no-baselines --name transformer_clean_p020_8  # 23.2 min
	$(TF_RECIPE) --seeds 8 --noise 0.4 --kinds '' --rhos 0.3,0.4 --name transformer_40_sam_r034  # 5.7 min
	$(TF_RECIPE) --seeds 8 --noise 0 --kinds '' --rhos 0.01 --name transformer_clean_sam_r001  # 3.9 min
	$(LABEL_NOISE_1) --no-baselines --noise 0.2 --p 0.2,0.5 --kinds sam_short,base_long --rhos 0.4 --name budget_cnn_20  # 4.8 min
	$(LABEL_NOISE_1) --no-baselines --noise 0.2 --p 0.2,0.5 --kinds sam_short --rhos 0.1,0.2 --name budget_cnn_20_short  # 6.5 min
	$(LABEL_NOISE_1) --no-baselines --noise 0.4 --p 0.2,0.5 --kinds sam_short,base_long --rhos 0.1,0.2,0.3 --name budget_cnn_40  # 14.7 min
	$(LABEL_NOISE_1) --no-baselines --noise 0.2,0.4 --p 0.1 --kinds looksam --alphas 0.5 --rhos 0.2,0.3 --name frontier_cnn_p010  # 6.0 min
	$(LABEL_NOISE_1) --no-baselines --noise 0.2,0.4 --p 0.1 --kinds looksam --alphas 0.7 --rhos 0.2,0.3,0.4 --name frontier_cnn_p010_a07  # 5.7 min
	$(BIN)/python -m benchmarks.label_noise.reuse_share --warm 300 --k 5  # about 10 min
	$(MAKE) transformer-report

# The CNN's fixed budget pools the new kinds with the saved recipe-1 parts
# (same seeds, data and initializations, so the pairing holds).
# The recommended configurations (the quick start; LookSAM with the warm-up,
# seeds 0-7 of the collapse parts) get rows of their own (--ours).
BUDGET_CNN := budget_cnn_20 budget_cnn_20_short label_noise_20_p050 label_noise_p020 label_noise_reuse_20_p020 label_noise_reuse_20_p020_low label_noise_reuse_20_p020_r01 label_noise_reuse_p050 collapse_r1_20_s07
BUDGET_CNN_40 := budget_cnn_40 label_noise_40_p050 label_noise_p020 label_noise_reuse_40_p020 label_noise_reuse_40_p020_r01 label_noise_reuse_p050 collapse_r1_40_new
BUDGET := $(BIN)/python -m benchmarks.label_noise.budget --ours 'LookSAM, alpha and rho warm-up 5 epochs p=0.2;every k, lam x k p=0.5'
# AdamW's recommendation is LookSAM at one setting: rho 0.1, alpha 0.25.
BUDGET_TF := $(BIN)/python -m benchmarks.label_noise.budget --ours 'LookSAM (every k + reuse) p=0.2@0.1,0.25'
TF_PARTS := transformer_20_p020 transformer_20_p050 transformer_20_p020_a05 transformer_20_p020_s37 transformer_20_p050_s37 transformer_20_p020_a05_s37 transformer_20_p020_a01_8
TF_PARTS_40 := transformer_40_p020_8 transformer_40_p050_8 transformer_40_sam_r034
TF_PARTS_CLEAN := transformer_clean_p050_8 transformer_clean_p020_8 transformer_clean_sam_r001
FRONTIER_CNN := frontier_cnn_p010 frontier_cnn_p010_a07 label_noise_20_p050 label_noise_40_p050 label_noise_reuse_20_p020 label_noise_reuse_20_p020_low label_noise_reuse_20_p020_r01 label_noise_reuse_40_p020 label_noise_reuse_40_p020_r01
# The pooled transformer reports alone, from the parts' JSON files (seconds).
transformer-report: $(STAMP)
	$(TRANSFORMER) --name transformer_20 --from-json $(subst $(eval) ,$(comma),$(foreach p,$(TF_PARTS),$(LN_RESULTS)/$(p).json))
	$(BUDGET_TF) --from-json $(LN_RESULTS)/transformer_20.json
	$(TRANSFORMER) --name transformer_40 --from-json $(subst $(eval) ,$(comma),$(foreach p,$(TF_PARTS_40),$(LN_RESULTS)/$(p).json))
	$(BUDGET_TF) --from-json $(LN_RESULTS)/transformer_40.json
	$(TRANSFORMER) --name transformer_clean --from-json $(subst $(eval) ,$(comma),$(foreach p,$(TF_PARTS_CLEAN),$(LN_RESULTS)/$(p).json))
	$(BUDGET_TF) --from-json $(LN_RESULTS)/transformer_clean.json
	$(LABEL_NOISE) --name frontier_cnn --from-json $(subst $(eval) ,$(comma),$(foreach p,$(FRONTIER_CNN),$(LN_RESULTS)/$(p).json))
	$(BUDGET) --from-json $(subst $(eval) ,$(comma),$(foreach p,$(BUDGET_CNN),$(LN_RESULTS)/$(p).json))
	$(BUDGET) --seed-list 0,1,2,3,4,5,6,7 --from-json $(subst $(eval) ,$(comma),$(foreach p,$(BUDGET_CNN_40),$(LN_RESULTS)/$(p).json))

# LookSAM's collapse rates (issue 24; benchmarks/results/collapse.md): 24
# seeds per cell, recipes 1-3 (2: --val-size 600 --epochs 115; 3: --lr 0.2)
# at 20% and 40% noise: the current LookSAM (periodic(5), reuse 0.5, rho 0.3)
# and the new one (alpha and rho warmed up linearly from 0 over 5 epochs,
# looksam_warm5_rho), with SGD (the collapse criterion) and SAM at its radius
# chosen on validation (0.4 at 20%, 0.3 at 40%). SGD and SAM of seeds 0-7 of
# recipe 1 at 20% and of recipe 2 are the label-noise parts' own runs
# (collapse_r*_base07.json, copied from label_noise_20_p050 and
# label_noise_recipe2_{20,40}: SGD and SAM rerun bit for bit). Recipe 3 at
# 40% also has the other remedies (alpha warm-up alone, no reuse for 5
# epochs, alpha 0.25). Recipe 3 at 20% ran its SAM (and SGD again) as a
# separate part. Then the traces of the first steps and the report.
LN_COLLAPSE := nice -n 10 $(BIN)/python -m benchmarks.label_noise --seeds 24 --p 0.2 --alphas 0.5 --rhos 0.3 --flat-top 0 --no-flatness --workers 1
LN_R2 := --val-size 600 --epochs 115
S07 := --seed-list 0,1,2,3,4,5,6,7
S823 := --seed-list 8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23
LN_BOTH := --kinds looksam,looksam_warm5_rho
bench-collapse: $(STAMP)
	$(LN_COLLAPSE) --noise 0.4 --kinds looksam --name collapse_r1_40_cur
	$(LN_COLLAPSE) --noise 0.4 --kinds looksam_warm5_rho --no-baselines --name collapse_r1_40_new
	$(LN_COLLAPSE) --noise 0.2 $(LN_BOTH) --sam-rhos 0.4 $(S823) --name collapse_r1_20_s823
	$(LN_COLLAPSE) --noise 0.2 $(LN_BOTH) --no-baselines $(S07) --name collapse_r1_20_s07
	$(LN_COLLAPSE) $(LN_R2) --noise 0.4 $(LN_BOTH) $(S823) --name collapse_r2_40_s823
	$(LN_COLLAPSE) $(LN_R2) --noise 0.4 $(LN_BOTH) --no-baselines $(S07) --name collapse_r2_40_s07
	$(LN_COLLAPSE) $(LN_R2) --noise 0.2 $(LN_BOTH) --sam-rhos 0.4 $(S823) --name collapse_r2_20_s823
	$(LN_COLLAPSE) $(LN_R2) --noise 0.2 $(LN_BOTH) --no-baselines $(S07) --name collapse_r2_20_s07
	$(LN_COLLAPSE) --lr 0.2 --noise 0.4 --kinds looksam,looksam_warm5 --name collapse_r3_40
	$(LN_COLLAPSE) --lr 0.2 --noise 0.4 --kinds looksam_warm5_rho,looksam_delay5 --no-baselines --name collapse_r3_40_try
	$(LN_COLLAPSE) --lr 0.2 --noise 0.4 --kinds looksam --alphas 0.25 --no-baselines --name collapse_r3_40_a025
	$(LN_COLLAPSE) --lr 0.2 --noise 0.2 $(LN_BOTH) --no-sam --name collapse_r3_20
	$(LN_COLLAPSE) --lr 0.2 --noise 0.2 --kinds '' --sam-rhos 0.4 --name collapse_r3_20_sam
	$(MAKE) collapse-trace collapse-report

# The traces of the first steps at 40% noise (collapse_trace.json / .png):
# collapsing seeds 0, 1 and 7 and the healthy seed 2 of recipe 3, and
# controls (no reuse, lr 0.1, the warm-ups, SAM).
LN_TRACE := nice -n 10 $(BIN)/python -m benchmarks.label_noise.trace --noise 0.4
collapse-trace: $(STAMP)
	rm -f $(LN_RESULTS)/collapse_trace.json
	$(LN_TRACE) --steps 200 --lr 0.2 --seed 1,2,0 --tag "α=0.5, lr 0.2"
	$(LN_TRACE) --steps 200 --lr 0.2 --seed 1 --warmup 135 --tag "α warm-up 135 steps, lr 0.2"
	$(LN_TRACE) --steps 200 --lr 0.2 --seed 1 --alpha 0 --tag "no reuse (α=0), lr 0.2"
	$(LN_TRACE) --steps 200 --lr 0.1 --seed 1 --tag "α=0.5, lr 0.1"
	$(LN_TRACE) --steps 300 --lr 0.2 --seed 1,7 --warmup 135 --rho-warmup --tag "α and ρ warm-up 135 steps, lr 0.2"
	$(LN_TRACE) --steps 300 --lr 0.2 --seed 7 --warmup 135 --tag "α warm-up 135 steps, lr 0.2"
	$(LN_TRACE) --steps 200 --lr 0.2 --seed 7 --k 1 --alpha 0 --tag "SAM (k=1, no reuse), lr 0.2"

# The collapse report alone, from the parts' JSON files (seconds).
collapse-report: $(STAMP)
	$(BIN)/python -m benchmarks.label_noise.collapse

# The documentation site, offline, with warnings as errors; open
# docs/_build/html/index.html afterwards.
docs: $(STAMP)
	rm -rf docs/_build
	$(BIN)/python -m sphinx -b html -W --keep-going docs docs/_build/html
	@echo "Built the docs: open docs/_build/html/index.html"

# Build the sdist and the wheel, twine check --strict, install the wheel alone
# (no Flax, no Equinox) into a fresh venv under /tmp, run a jitted step there and
# check that the Flax and Equinox helpers ask for their extras.
wheel-check: $(STAMP)
	bash .ci/wheel_check.sh $(BIN)/python

# The lowest declared versions (constraints-min.txt) on the lowest declared
# Python, 3.11, in .venv-min: the tests and the doctests but the slow ones
# (multi-process runs, end-to-end benchmark and example scripts; `make test`
# runs those, and the docs pages, written for the pinned versions), -x, on 2
# workers.
VENV_MIN := .venv-min
$(VENV_MIN)/.installed: pyproject.toml constraints-min.txt
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(VENV_MIN)/bin/python -m pip install -q -c constraints-min.txt -e '.[dev]'
	touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/python -m pytest -x -q -p no:cacheprovider -n 2 -m 'not slow' tests rst_optax

# The newest Python that JAX supports among those installed (3.13, through
# pyenv), with the pinned versions, in .venv-py313: the tests and doctests but
# the slow multi-process ones (`make test` runs those and the docs pages), -x,
# on 2 workers.
PYTHON_NEW ?= $(shell PYENV_VERSION=3.13 pyenv which python 2>/dev/null || command -v python3.13)
VENV_NEW := .venv-py313
$(VENV_NEW)/.installed: pyproject.toml constraints.txt
	$(PYTHON_NEW) -m venv $(VENV_NEW)
	$(VENV_NEW)/bin/python -m pip install -q --upgrade pip
	$(VENV_NEW)/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

test-py313: $(VENV_NEW)/.installed
	$(VENV_NEW)/bin/python -m pytest -x -q -p no:cacheprovider -n 2 -m 'not slow' tests rst_optax

# The type hints of the package, checked by mypy (config in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(VENV_MIN) $(VENV_NEW) .pytest_cache .ruff_cache .mypy_cache .hypothesis docs/_build build dist
