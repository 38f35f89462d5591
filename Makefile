# Helio: `make demo` and `make test` are all a newcomer needs.
PYTHON     ?= python3.11
VENV       ?= .venv
# CPU build by default; a GPU user overrides, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STORAGE    ?= ./runs
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.helio-installed

.PHONY: install demo serve test bench proto clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# DeepSpeed's setup imports torch: build it against the torch above, ops just in time.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) -m jobs.prepare jobs/configs/prepare_demo.yaml --set storage=$(STORAGE)
	$(PY) -m jobs.pretrain jobs/configs/pretrain_demo.yaml --set storage=$(STORAGE)
	$(PY) -m jobs.quantize jobs/configs/quantize_demo.yaml --set storage=$(STORAGE)
	$(PY) -m jobs.make_tasks jobs/configs/make_tasks_demo.yaml --set storage=$(STORAGE)
	$(PY) -m jobs.finetune jobs/configs/finetune_embed_demo.yaml --set storage=$(STORAGE)
	$(PY) -m jobs.serve jobs/configs/serve_demo.yaml --set storage=$(STORAGE) --set serve_seconds=0
	@echo "demo outputs are under $(STORAGE)/: datasets/prepare_demo (Parquet shards, tokenizer.json),"
	@echo "runs/pretrain_demo (checkpoints, metrics.jsonl, loss.png), models/pretrain_demo (Hugging Face layout),"
	@echo "models/quantize_demo (int8: model.safetensors, quantization.json, report.json),"
	@echo "tasks/stdlib_tasks (SFT, classification, retrieval JSONL), models/all-minilm-l6-v2 (imported base),"
	@echo "adapters/finetune_embed_demo (PEFT LoRA), models/finetune_embed_demo (merged),"
	@echo "serving/serve_demo (references the monitor compares with, canary routing), monitor/serve_demo (its state)."
	@echo "More finetunes on the same storage: jobs/configs/finetune_sft_demo.yaml, finetune_cls_demo.yaml"
	@echo "Serve them until Ctrl-C: make serve (OpenAI-compatible HTTP on 127.0.0.1:8000, gRPC on 9000, monitored)"

serve: install
	$(PY) -m jobs.serve jobs/configs/serve_demo.yaml --set storage=$(STORAGE)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/finetune.py
	$(PY) benchmarks/quantize.py --storage $(STORAGE)
	$(PY) benchmarks/serve.py --storage $(STORAGE)

# after editing actors/proto/helio.proto (tests/test_serve_config.py checks the committed stubs are current)
proto: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. actors/proto/helio.proto

clean:
	rm -rf $(VENV) runs .pytest_cache
