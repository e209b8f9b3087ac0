# Every target creates the project's virtualenv when it is missing.
# .venv installs exactly the versions in requirements.lock (what was last tested); the other lanes
# test what a user of the library would get from the ranges in requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FAST_SUITE := pytest -q -m "not slow"
# The oldest transformers the range in requirements.txt admits (`transformers>=X,<Y`).
OLDEST_TRANSFORMERS := $(shell sed -n 's/^transformers>=\([0-9.]*\).*/\1/p' requirements.txt)

$(VENV)/.installed: requirements.txt setup.cfg requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c requirements.lock --upgrade pip
	$(VENV)/bin/pip install -c requirements.lock -e ".[dev]"
	touch $@

.PHONY: install test test-slow test-latest test-next test-oldest test-cross-version install-lmms-eval test-lmms-eval lock demo demo-cot readme-check gpu-check
install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/$(FAST_SUITE)

# The slow lane also runs DeepSpeed ZeRO-2/3 (tests/test_deepspeed.py): the `deepspeed` extra; and the lmms-eval
# plug-in's lane (its extra cannot share .venv: see test-lmms-eval).
test-slow: $(VENV)/.installed
	$(VENV)/bin/pip install -q -c requirements.lock -e ".[deepspeed]"
	$(VENV)/bin/pytest -q -m slow
	$(MAKE) test-lmms-eval

# One command for a GPU machine: InternVL3-1B-sized step time and memory (ours vs the floor), batched evaluation
# speed, a ZeRO-3 and an FSDP2 step; JSON in outputs/gpu_check.json. On CPU it runs at toy size.
gpu-check: $(VENV)/.installed
	$(VENV)/bin/pip install -q -c requirements.lock -e ".[deepspeed]"
	$(PY) -m benchmarks.gpu_check --out outputs/gpu_check.json

# The newest releases the ranges allow (no lock), in a venv made anew each time: a rename upstream
# shows up here as a failing test (setup.cfg turns transformers' deprecations into errors).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q --upgrade -e ".[dev]"
	.venv-latest/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|peft|datasets|tokenizers) '
	.venv-latest/bin/$(FAST_SUITE)

# The lock, with the newest transformers release over it: 5.25.0 needs `kernels>=0.19.1,<0.20`, which this machine's
# index cannot resolve (it stops at 0.17.2), so it is installed with --no-deps and hub kernels are switched off
# (USE_HUB_KERNELS=0; 5.25's from_pretrained otherwise defaults to use_kernels=True and raises without `kernels`).
NEXT_TRANSFORMERS ?= 5.25.0
.venv-next/.installed: requirements.txt setup.cfg requirements.lock
	rm -rf .venv-next
	$(PYTHON) -m venv .venv-next
	.venv-next/bin/pip install -q -c requirements.lock --upgrade pip
	.venv-next/bin/pip install -q -c requirements.lock -e ".[dev]"
	.venv-next/bin/pip install -q --no-deps "transformers==$(NEXT_TRANSFORMERS)"
	touch $@

test-next: .venv-next/.installed
	.venv-next/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|kernels) '
	USE_HUB_KERNELS=0 .venv-next/bin/$(FAST_SUITE)

# The lock, with transformers at the oldest version requirements.txt admits.
.venv-oldest/.installed: requirements.txt setup.cfg requirements.lock
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	grep -v '^transformers==' requirements.lock > .venv-oldest/constraints.txt
	.venv-oldest/bin/pip install -q -c .venv-oldest/constraints.txt --upgrade pip
	.venv-oldest/bin/pip install -q -c .venv-oldest/constraints.txt -e ".[dev]" "transformers==$(OLDEST_TRANSFORMERS)"
	touch $@

test-oldest: .venv-oldest/.installed
	.venv-oldest/bin/$(FAST_SUITE)

# A checkpoint saved under the locked transformers loads (remote code) and generates under the oldest, and back.
test-cross-version: $(VENV)/.installed .venv-oldest/.installed
	MMCOCONUT_OTHER_PYTHON=$(CURDIR)/.venv-oldest/bin/python $(VENV)/bin/pytest -q tests/test_cross_version.py

# The lmms-eval plug-in (the `lmms-eval` extra, about 100 more packages) in a venv of its own, over the lock: lmms-eval
# 0.7.3 needs filelock<4 and its wandb needs protobuf<7, so those two pins of the lock are left to pip. Runs the
# plug-in's tests, slow ones included (the agreement with evaluate_aokvqa.py, 2 processes); .venv skips them.
.venv-lmms/.installed: requirements.txt setup.cfg requirements.lock
	rm -rf .venv-lmms
	$(PYTHON) -m venv .venv-lmms
	grep -vE '^(filelock|protobuf)==' requirements.lock > .venv-lmms/constraints.txt
	.venv-lmms/bin/pip install -q -c .venv-lmms/constraints.txt --upgrade pip
	.venv-lmms/bin/pip install -q -c .venv-lmms/constraints.txt -e ".[dev,lmms-eval]"
	touch $@

install-lmms-eval: .venv-lmms/.installed

test-lmms-eval: .venv-lmms/.installed
	.venv-lmms/bin/pip list 2>/dev/null | grep -iE '^(lmms.eval|filelock|torch|transformers) '
	.venv-lmms/bin/pytest -q tests/test_integrations_lmms_eval.py

# Re-resolve every dependency (newest allowed releases) in a clean venv and write the exact versions.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q -e ".[dev]"
	{ echo "# Exact versions of everything \`make install\` installs (pip constraints). Written by \`make lock\`: do not edit."; \
	  .venv-lock/bin/pip freeze --all --exclude-editable | grep -v '^mmcoconut'; } > requirements.lock
	rm -rf .venv-lock

# `make demo` again replaces the previous demo; train.py itself refuses to train over a previous run.
demo: $(VENV)/.installed
	@echo "make demo: Coconut's stages 1-3 on a generated 3-hop visual task, from the tiny CoT model in checkpoints/demo-cot."
	@echo "About 3 minutes on 2 quiet CPU cores (up to 8 when busy); it ends with a table of MC accuracy per stage"
	@echo "(the CoT model: 100%; the last stage, 3 thoughts and no written step: at least 80%) and the tokens each generates."
	$(PY) train.py recipes/demo.yaml --overwrite_output_dir true

# Re-makes the demo's starting point, checkpoints/demo-cot (the tiny model trained with written chain-of-thought).
demo-cot: $(VENV)/.installed
	$(PY) train.py recipes/demo_cot.yaml --overwrite_output_dir true
	rm -rf checkpoints/demo-cot && mkdir -p checkpoints/demo-cot
	cd outputs/demo-cot && cp README.md chat_template.jinja config.json eval_results.json generation_config.json \
	    model.safetensors processor_config.json tokenizer.json tokenizer_config.json ../../checkpoints/demo-cot/

# Every ```bash block of README.md, in order, in a fresh copy of the working tree (tests/readme_check.py).
readme-check: $(VENV)/.installed
	$(PY) tests/readme_check.py
