# Set-up and everyday commands; README.md's commands call these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= build/demo

.PHONY: install demo test test-fast bench bench-gpu lint clean

install: $(VENV)/.installed

# torch is pinned here (a CPU build on machines without a GPU); the package itself asks for a range.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,optimizers]'
	touch $@

demo: install
	rm -rf $(DEMO)
	$(BIN)/difftrain-dist models init-tiny sd15 $(DEMO)/tiny-sd15
	$(BIN)/python -m difftrain_dist.data_shards.examples $(DEMO)/photos
	$(BIN)/difftrain-dist shards build $(DEMO)/photos $(DEMO)/shards --resolution 64 --samples-per-shard 8
	$(BIN)/difftrain-dist train configs/demo_sd15.yaml
	$(BIN)/difftrain-dist checkpoints $(DEMO)/runs/demo-sd15
	$(BIN)/difftrain-dist sample $(DEMO)/tiny-sd15 "a photo of an astronaut" --out $(DEMO)/samples/base.png
	$(BIN)/difftrain-dist sample $(DEMO)/tiny-sd15 "a photo of an astronaut" \
		--lora $(DEMO)/outputs/demo-sd15.safetensors --out $(DEMO)/samples/lora.png
	@echo
	@echo "model:       $(DEMO)/tiny-sd15"
	@echo "shards:      $(DEMO)/shards (index.json lists samples and skipped files)"
	@echo "checkpoints: $(DEMO)/runs/demo-sd15"
	@echo "LoRA:        $(DEMO)/outputs/demo-sd15.safetensors"
	@echo "samples:     $(DEMO)/samples/base.png (no LoRA), $(DEMO)/samples/lora.png (with LoRA)"

test: install
	$(BIN)/python -m pytest -ra --durations=15

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow"

bench: install
	$(BIN)/python -m benchmarks

bench-gpu: install  # one CUDA GPU: SDXL and FLUX layouts at 1024 px, ours vs a plain eager loop
	$(BIN)/python -m benchmarks.gpu_check

lint: install
	$(BIN)/ruff check difftrain_dist tests benchmarks

clean:
	rm -rf build .pytest_cache
