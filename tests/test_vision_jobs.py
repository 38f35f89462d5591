"""The vision path on a real local Ray cluster: jobs.prepare_images -> jobs.pretrain (ResNet, ViT) ->
jobs.finetune (full, LoRA) with real DeepSpeed, the classification report, and transfer measured against
training from scratch."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cluster.config import load_config
from cluster.storage import Storage, blocks
from jobs import finetune, prepare_images, pretrain
from models.hf_vision import load_vision, normalize

pytestmark = pytest.mark.ray

TINY_VIT = ["model.arch=vit", "model.patch_size=8", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.intermediate_size=64", "model.widths=[]", "model.depths=[]", "model.stem_width=0"]


@pytest.fixture(scope="module")
def images(ray_cluster, tmp_path_factory) -> str:
    """A storage root with the demo's two image datasets: glyphs (pretraining) and digits (10 a class)."""
    root = str(tmp_path_factory.mktemp("vision"))
    for config in ("prepare_images_glyphs", "prepare_images_digits"):
        assert prepare_images.main([f"jobs/configs/{config}.yaml", "--set", f"storage={root}"]) == 0
    return root


def _pretrain(storage: str, config: str, name: str, *overrides: str) -> dict:
    cfg = load_config(pretrain.PretrainConfig, f"jobs/configs/{config}.yaml",
                      [f"storage={storage}", f"name={name}", *overrides])
    return pretrain.run(cfg)


def _finetune(storage: str, name: str, *overrides: str) -> dict:
    cfg = load_config(finetune.FinetuneConfig, "jobs/configs/finetune_resnet_digits.yaml",
                      [f"storage={storage}", f"name={name}", *overrides])
    return finetune.run(cfg)


@pytest.fixture(scope="module")
def trained(images) -> dict:
    """The demo's recipe, once: a ResNet pretrained on the glyphs, finetuned on 10 digits a class beside the
    same ResNet from scratch, then int8; the three manifests."""
    base = _pretrain(images, "pretrain_resnet_glyphs", "resnet_glyphs")
    tuned = _finetune(images, "resnet_digits")
    from jobs import quantize

    int8 = quantize.run(load_config(quantize.QuantizeConfig, "jobs/configs/quantize_resnet_digits.yaml",
                                    [f"storage={images}"]))
    return {"base": base, "tuned": tuned, "int8": int8}


def _test_split(storage: str) -> tuple[torch.Tensor, np.ndarray]:
    art = Storage(storage).open("dataset", "digits")
    tables = [pq.read_table(art.file_uri(rel)) for rel in art.manifest["images"]["splits"]["test"]["shards"]]
    return (torch.from_numpy(np.concatenate([blocks(t, "pixels") for t in tables])),
            np.concatenate([blocks(t, "label") for t in tables]))


@pytest.mark.slow
def test_glyph_pretraining_transfers_to_ten_digits_a_class_better_than_training_from_scratch(images, trained):
    """A ResNet pretrained on rendered glyphs, finetuned on 100 labelled digits, beats the same ResNet trained
    from scratch on the same 100 images for the same steps, on 510 test digits; the report is scikit-learn's."""
    from transformers import ResNetForImageClassification

    assert trained["base"]["metrics"]["val_accuracy"] > 0.5  # 62 classes: chance is 0.016
    m = trained["tuned"]["metrics"]
    pretrained, scratch = m["transfer"]["pretrained"], m["transfer"]["scratch"]
    # Measured 0.87-0.88 against 0.81-0.82 over three seeds (2026-12-07, AMD EPYC): the gap, 5-7 points,
    # is 2-3 standard errors of a 510-image accuracy; the test asks only that it is positive.
    assert pretrained["accuracy"] > scratch["accuracy"] and pretrained["macro_f1"] > scratch["macro_f1"], m
    assert m["test"] == pretrained and m["test_images"] == 510 and m["train_images"] == 100

    art = Storage(images).open("model", "resnet_digits")
    report = json.loads(art.read_bytes("report.json"))
    assert [str(d) for d in range(10)] == [k for k in report if k.isdigit()]
    assert report["micro avg"]["f1-score"] == pytest.approx(report["accuracy"]) == pytest.approx(
        pretrained["accuracy"])
    assert sum(report[str(d)]["support"] for d in range(10)) == report["macro avg"]["support"] == 510
    text = art.read_bytes("report.txt").decode()
    for row in ("precision", "accuracy", "micro avg", "macro avg", "weighted avg"):
        assert row in text
    assert art.read_bytes("confusion.png")[:8] == b"\x89PNG\r\n\x1a\n"

    # the exported folder is a ResNetForImageClassification: transformers computes Helio's logits
    folder = Storage(images).root_path + "/models/resnet_digits"
    model, labels, size = load_vision(folder)
    hf = ResNetForImageClassification.from_pretrained(folder).eval()
    pixels, truth = _test_split(images)
    pixels = pixels[:64]
    x = normalize(pixels.view(-1, size, size, 1))
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model.eval()(x), rtol=1e-4, atol=1e-4)
    assert labels == [str(d) for d in range(10)] and hf.config.id2label[3] == "3"


@pytest.mark.slow
def test_int8_resnet_passes_its_gate_and_the_artifact_scores_what_its_report_says(images, trained):
    from models.quant_vision import load_int8_vision

    qm = trained["int8"]
    assert qm["quality_gate"]["passed"] and not qm["rejected"] and qm["quantization"]["scheme"] == "static"
    assert qm["metrics"]["accuracy_float"] == pytest.approx(trained["tuned"]["metrics"]["test"]["accuracy"])
    assert qm["metrics"]["size_ratio"] < 0.35  # int8 weights: a quarter of fp32, plus scales and the float rest
    q_report = json.loads(Storage(images).open("model", "resnet_digits_int8").read_bytes("report.json"))
    assert set(q_report["latency_ms"]) == {"b1", "b32"} and q_report["calibration_images"] == 512
    int8, _, size = load_int8_vision(Storage(images).root_path + "/models/resnet_digits_int8")
    pixels, truth = _test_split(images)
    with torch.no_grad():
        predicted = int8(normalize(pixels.view(-1, size, size, 1))).argmax(-1).numpy()
    assert (predicted == truth).mean() == pytest.approx(qm["metrics"]["accuracy_int8"])


def test_a_vit_pretrains_under_zero3_and_lora_finetunes_its_attention_and_mlp(images):
    """One real run of each vision job in the fast tier: a tiny ViT, sharded by ZeRO-3, then LoRA on its
    attention and MLP with a new head; the PEFT adapter applied by peft to transformers' ViT gives the
    merged model's logits."""
    from peft import PeftModel
    from transformers import ViTForImageClassification

    base = _pretrain(images, "pretrain_resnet_glyphs", "vit_glyphs", *TINY_VIT, "zero.stage=3", "train.steps=40",
                     "train.eval_every=20", "train.checkpoint_every=20", "train.micro_batch=16")
    assert base["model"]["arch"] == "vit" and base["metrics"]["val_accuracy"] is not None
    assert load_file(f"{images}/models/vit_glyphs/model.safetensors")["vit.embeddings.position_embeddings"].shape == \
        (1, 17, 32)  # gathered from the ZeRO-3 shards: 16 patches and [CLS]
    lora = _finetune(images, "vit_digits", "base.artifact=vit_glyphs", "method=lora", "lora.rank=2", "compare_scratch=false",
                     "train.steps=10", "train.eval_every=10", "train.checkpoint_every=10", "optim.lr=0.005")
    m = lora["metrics"]
    assert m["transfer"] is None and 0 <= m["test"]["accuracy"] <= 1
    merged_params = sum(t.numel() for t in load_file(f"{images}/models/vit_digits/model.safetensors").values())
    assert m["trainable_params"] < merged_params / 4  # the adapters and the head only

    store = Storage(images)
    adapter = store.open("adapter", "vit_digits")
    config = json.loads(adapter.read_bytes("adapter_config.json"))
    assert set(config["target_modules"]) == {"attention.q_proj", "attention.k_proj", "attention.v_proj",
                                             "attention.o_proj", "mlp.fc1", "mlp.fc2"}  # transformers' names
    base_hf = ViTForImageClassification.from_pretrained(f"{images}/models/vit_glyphs", num_labels=10,
                                                        ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base_hf, f"{images}/adapters/vit_digits").eval()
    merged, _, size = load_vision(f"{images}/models/vit_digits")
    pixels = _test_split(images)[0][:16]
    x = normalize(pixels.view(-1, size, size, 1))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(pixel_values=x).logits, merged.eval()(x), rtol=1e-4, atol=1e-4)

    # jobs.quantize on a ViT: dynamic int8 of its Linear layers, scored and timed like the ResNet (a barely
    # trained tiny model's accuracy moves by chance here, so the gate is opened: the path is what is tested)
    from jobs import quantize
    from models.quant_vision import load_int8_vision

    qm = quantize.run(load_config(quantize.QuantizeConfig, "jobs/configs/quantize_resnet_digits.yaml",
                                  [f"storage={images}", "name=vit_digits_int8", "model=vit_digits",
                                   "max_quality_delta=1.0", "eval.iters=5"]))
    assert qm["quantization"]["scheme"] == "dynamic" and qm["metrics"]["size_ratio"] < 1
    int8, _, _ = load_int8_vision(f"{images}/models/vit_digits_int8")
    with torch.no_grad():
        assert int8(x).shape == merged(x).shape


@pytest.mark.slow
def test_an_image_run_that_fails_resumes_to_the_same_weights(images):
    """Augmentation comes from the step's seeded generator and data order is global: a run whose worker
    fails at step 5 resumes from its step-4 checkpoint and ends with the uninterrupted run's weights."""
    tiny = ["model.widths=[8, 16]", "model.depths=[1, 1]", "model.stem_width=8", "train.steps=8",
            "train.micro_batch=8", "train.eval_every=4", "train.checkpoint_every=2", "train.log_every=1",
            "failure.num_to_keep=4"]
    _pretrain(images, "pretrain_resnet_glyphs", "resnet_whole", *tiny)
    _pretrain(images, "pretrain_resnet_glyphs", "resnet_fault", *tiny, "fault.at_step=5", "fault.rank=1")
    records = [json.loads(line) for line in open(f"{images}/runs/resnet_fault/metrics.jsonl")]
    assert any(r.get("attempt_start_step") == 4 for r in records), records  # resumed, not restarted
    whole, fault = (load_file(f"{images}/models/{n}/model.safetensors") for n in ("resnet_whole", "resnet_fault"))
    assert whole.keys() == fault.keys()
    for k in whole:
        torch.testing.assert_close(fault[k], whole[k], rtol=0, atol=0, msg=k)


def test_wrong_pairings_of_model_and_data_are_refused_in_one_sentence(images):
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match="dataset 'glyphs' holds images: train a resnet or vit on it, not a gpt"):
        _pretrain(images, "pretrain_resnet_glyphs", "bad1", "model.arch=gpt", "model.widths=[]", "model.depths=[]",
                  "model.stem_width=0")
    with pytest.raises(ConfigError, match="model.patch_size.*5 does not divide the dataset's 32-pixel images"):
        _pretrain(images, "pretrain_resnet_glyphs", "bad2", *TINY_VIT[:1], "model.patch_size=5", *TINY_VIT[2:])


def _png_b64(pixels: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_served_image_classifiers_answer_what_the_artifacts_compute_over_http_and_grpc(images, trained, serve_ports):
    """The finetuned ResNet and its int8 version on Ray Serve: base64 PNGs and data URLs in, the labels
    and probabilities the artifacts compute in-process out, batched; every mistake a 4xx naming the
    input; gRPC Classify the same; the monitor's probe of known images passes against its references."""
    import dataclasses
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from ray import serve

    from actors.proto import helio_pb2 as pb
    from actors.proto import helio_pb2_grpc
    from jobs import monitor as monitor_job
    from jobs import serve as serve_job
    from models.quant_vision import load_int8_vision

    cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={images}", "name=vision_app", f"http.port={serve_ports['http']}",
        f"grpc.port={serve_ports['grpc']}", "http.max_image_pixels=4096", "start_timeout_s=300", "route_prefix=/vision",
        "models=[{id: digits, artifact: resnet_digits, task: classify, num_cpus: 0.2, max_batch_size: 8,"
        " batch_wait_s: 0.05}, {id: digits-int8, artifact: resnet_digits_int8, task: classify, num_cpus: 0.2}]"])
    url = serve_job.deploy(cfg)
    assert url.endswith(":%d/vision" % serve_ports["http"])  # beside any other application, under its prefix
    try:
        serve_job.record_references(cfg, url)  # what jobs.serve does after deploying: the monitor's references
        def post(body: dict) -> tuple[int, dict]:
            req = urllib.request.Request(url + "/v1/classify", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        from actors.serve_openapi import ModelList

        with urllib.request.urlopen(url + "/v1/models", timeout=60) as r:  # as its OpenAPI document says
            listed = ModelList.model_validate(json.loads(r.read()))
        assert {(m.id, m.task, m.context) for m in listed.data} == {("digits", "classify", None),
                                                                     ("digits-int8", "classify", None)}
        pixels, truth = _test_split(images)
        sample = pixels[:24].view(-1, 32, 32).numpy()
        inputs = [_png_b64(p) for p in sample]
        inputs[1] = "data:image/png;base64," + inputs[1]  # a data URL is an image too
        for model_id, artifact, load in (("digits", "resnet_digits", load_vision),
                                         ("digits-int8", "resnet_digits_int8", load_int8_vision)):
            local, labels, size = load(f"{images}/models/{artifact}")
            with torch.no_grad():
                probs = local.eval()(normalize(pixels[:24].view(-1, 32, 32, 1))).softmax(-1)
            with ThreadPoolExecutor(6) as pool:  # one request per image, concurrently: the replica batches them
                answers = list(pool.map(lambda i: post({"model": model_id, "input": inputs[i]}), range(24)))
            assert all(status == 200 for status, _ in answers), answers[:2]
            for i, (_, body) in enumerate(answers):
                served = [body["data"][0]["probabilities"][name] for name in labels]
                torch.testing.assert_close(torch.tensor(served), probs[i], rtol=1e-4, atol=1e-5)
                assert body["data"][0]["label"] == labels[int(probs[i].argmax())]
            status, many = post({"model": model_id, "input": inputs[:8]})
            assert status == 200 and [d["index"] for d in many["data"]] == list(range(8))

        png = inputs[0]
        wide = _png_b64(np.zeros((64, 65), np.uint8))  # 4,160 pixels: over http.max_image_pixels
        for body, code, words in (
                ({"model": "digits", "input": [png, "not base64!"]}, 400, "input[1]: is not base64 image data"),
                ({"model": "digits", "input": [png, png, "aGVsbG8gd29ybGQ="]}, 400, "input[2]: is not a PNG or JPEG"),
                ({"model": "digits", "input": [png[:120]]}, 400, "input[0]: is a truncated image"),
                ({"model": "digits", "input": [png, wide]}, 413, "input[1]: the image is 65x64, more than 4,096"),
                ({"model": "digits", "input": []}, 400, "input: must hold at least one image")):
            status, answer = post(body)
            assert status == code and words in answer["error"]["message"], (status, answer)
        req = urllib.request.Request(url + "/v1/embeddings", data=json.dumps({"model": "digits", "input": png}).encode(),
                                     headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400 and "serves classify, not embed" in json.loads(e.value.read())["error"]["message"]

        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc.port}") as channel:
            stub = helio_pb2_grpc.HelioStub(channel)
            reply = stub.Classify(pb.ClassifyRequest(model="digits", input=inputs[:4]), timeout=60)
            _, http = post({"model": "digits", "input": inputs[:4]})
            assert [d.label for d in reply.data] == [d["label"] for d in http["data"]]
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(pb.ClassifyRequest(model="digits", input=["???"]), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input[0]" in err.value.details()

        refs = json.loads(open(f"{images}/serving/vision_app/references.json").read())
        assert len(refs["models"]["digits"]["expected"]) == 3  # the glyphs 0, 1 and 7, as answered at deploy
        mon = load_config(monitor_job.MonitorConfig, None, [f"storage={images}", "app=vision_app", "period_s=0.5",
                                                            "timeout_s=10", "restart=true"])
        monitor_job.start(mon)
        status = monitor_job.run(dataclasses.replace(mon, monitor_seconds=0))
        for model_id in ("digits", "digits-int8"):
            probes = {p["probe"]: p for p in status["models"][model_id]["rounds"][-1]["probes"]}
            assert probes["semantic"]["ok"], probes["semantic"]
    finally:
        import ray

        from actors.monitor import NAMESPACE, actor_name

        try:
            ray.kill(ray.get_actor(actor_name("vision_app"), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
        serve.delete(cfg.name)
