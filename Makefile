# Two commands a newcomer needs: `make demo` and `make test` (`make test-fast`: the unit tier, for the inner loop).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TINY_MODEL := models/tiny-phi3
TINY_RECIPE := recipes/examples/tiny-cpu.yaml
IMAGE ?= qc-train-phi:dev

# One process: tests/conftest.py can schedule pytest-xdist workers (-n 2), but such runs hung at their end here.
PYTEST := $(BIN)/python -m pytest -q

.PHONY: setup tiny-model demo demo-dpo test test-fast lint lock image smoke bench clean

setup: $(VENV)/.installed

# The venv gets exactly the versions locked for the image (hashes stripped: here torch is the
# CPU build of the same version), so what `make test` runs against is what the image holds; what the image
# leaves out although a package requires it (docker/left-out.txt) leaves the venv too.
$(VENV)/.installed: pyproject.toml docker/requirements.lock docker/left-out.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python docker/lock_to_constraints.py docker/requirements.lock > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[test,trackers]'
	$(BIN)/python -m pip uninstall -q -y $$(grep -v -e '^#' -e '^ *$$' docker/left-out.txt)
	touch $@

tiny-model: setup $(TINY_MODEL)/config.json

$(TINY_MODEL)/config.json: entrypoint/qctrain/tiny.py  # rebuilt when tiny.py changes
	$(BIN)/qctrain tiny-model $(TINY_MODEL)

demo: setup tiny-model
	$(BIN)/qctrain train --restart $(TINY_RECIPE)  # always a fresh run
	@$(BIN)/python -c "import json; rows = [json.loads(l) for l in open('out/tiny-cpu/metrics.jsonl')]; \
	  loss = [r for r in rows if 'loss' in r]; \
	  print(f\"loss {loss[0]['loss']:.2f} -> {loss[-1]['loss']:.2f}, next-token accuracy \
	  {loss[0]['mean_token_accuracy']:.0%} -> {loss[-1]['mean_token_accuracy']:.0%} (plot: out/tiny-cpu/loss.png)\")"
	$(BIN)/qctrain generate out/tiny-cpu --compare-base --prompt "Who are you?"
	@echo "trained to answer: $$($(BIN)/python -c "import json; print(json.load(open('data/identity.json'))[0]['output'])")"
	@echo "model card:  out/tiny-cpu/README.md (also in out/tiny-cpu/adapter/, the folder to share)"
	@echo "GGUF LoRA:   out/tiny-cpu/gguf/tiny-cpu-lora-f32.gguf (llama.cpp: --lora)"
	@echo "Modelfile:   out/tiny-cpu/gguf/Modelfile (ollama create tiny-cpu -f out/tiny-cpu/gguf/Modelfile)"

# Preference tuning, SFT -> DPO: both styles learnt by SFT, the polite one preferred after DPO.
demo-dpo: setup tiny-model
	$(BIN)/qctrain train --restart recipes/examples/tiny-style-sft.yaml
	$(BIN)/qctrain train --restart recipes/examples/tiny-style-dpo.yaml
	@$(BIN)/python -c "import json; rows = [json.loads(l) for l in open('out/tiny-style-dpo/metrics.jsonl')]; \
	  ev = [r for r in rows if 'eval_rewards/accuracies' in r]; \
	  print(f\"held-out reward accuracy {ev[0]['eval_rewards/accuracies']:.2f} (step {ev[0]['step']}) -> \
	  {ev[-1]['eval_rewards/accuracies']:.2f} (step {ev[-1]['step']}), margin {ev[0]['eval_rewards/margins']:.2f} -> \
	  {ev[-1]['eval_rewards/margins']:.2f} (plot: out/tiny-style-dpo/loss.png)\")"
	$(BIN)/qctrain generate out/tiny-style-dpo --compare-parent --prompt "What do bees make?"
	$(BIN)/qctrain generate out/tiny-style-dpo --compare-base --prompt "What do bees make?"

test: setup  # the whole suite; the image tests run in docker/ci.sh, after the build
	$(PYTEST) -m "not docker"

test-fast: setup  # the unit tier: no training run, no model loaded, nothing that starts the training stack
	$(PYTEST) -m "not slow and not docker"

lint: setup
	$(BIN)/ruff check entrypoint tests bench

lock:
	bash docker/lock.sh

image:
	bash docker/build-image.sh $(IMAGE)

smoke:
	bash docker/smoke.sh $(IMAGE)

bench: setup tiny-model
	$(BIN)/python bench/run_all.py

clean:
	rm -rf out models
