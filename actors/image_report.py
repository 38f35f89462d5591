"""Scoring an image classifier on a split of an image dataset, and the report the founding document
shows: per-class precision, recall, F1 and support with micro, macro and weighted averages
(scikit-learn's metrics), and a confusion-matrix PNG.

`predict_split` runs as a Ray task beside the data (the driver may be a laptop); the report is built
where the predictions arrive.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import ray


@ray.remote(num_cpus=1)
def predict_split(model_uri: str, shard_uris: list[str], threads: int = 1) -> dict[str, Any]:
    """{labels: true ids, predicted: ids} of every image in `shard_uris` by the model in `model_uri`."""
    import pyarrow.parquet as pq
    import torch

    from cluster.storage import blocks, fetch_folder, resolve
    from models.hf_vision import load_vision, normalize

    torch.set_num_threads(threads)
    folder = fetch_folder(model_uri, ("config.json", "model.safetensors"))
    model, _, size = load_vision(folder.name)
    model.eval()
    true, predicted = [], []
    for uri in shard_uris:
        fs, path = resolve(uri)
        table = pq.read_table(path, filesystem=fs, columns=["pixels", "label"])
        pixels = torch.from_numpy(blocks(table, "pixels"))
        with torch.no_grad():
            for i in range(0, len(pixels), 256):
                x = normalize(pixels[i:i + 256].view(-1, size, size, model.cfg.channels))
                predicted.append(model(x).argmax(-1).numpy())
        true.append(blocks(table, "label"))
    return {"labels": np.concatenate(true).astype(int).tolist(), "predicted": np.concatenate(predicted).tolist()}


def accuracy_and_f1(labels: list[int], predicted: list[int], classes: int) -> dict[str, float]:
    """The two numbers a classifier is gated and compared on: accuracy and macro-averaged F1."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(labels, predicted)),
            "macro_f1": float(f1_score(labels, predicted, labels=list(range(classes)), average="macro",
                                       zero_division=0))}


def classification_report(labels: list[int], predicted: list[int], names: list[str]) -> tuple[dict, str]:
    """(the report as data, as text): per class precision / recall / F1 / support, then accuracy and the
    micro, macro and weighted averages, in scikit-learn's layout."""
    from sklearn import metrics

    ids = list(range(len(names)))
    report = metrics.classification_report(labels, predicted, labels=ids, target_names=names, output_dict=True,
                                           zero_division=0)
    p, r, f, s = metrics.precision_recall_fscore_support(labels, predicted, labels=ids, average="micro",
                                                         zero_division=0)
    report["micro avg"] = {"precision": p, "recall": r, "f1-score": f, "support": len(labels)}
    text = metrics.classification_report(labels, predicted, labels=ids, target_names=names, digits=4,
                                         zero_division=0)
    width = max(len(n) for n in [*names, "weighted avg"])
    micro = f"{'micro avg':>{width}} {p:>9.4f} {r:>9.4f} {f:>9.4f} {len(labels):>9}\n"
    lines = text.rstrip("\n").split("\n")
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("macro avg"))
    return report, "\n".join(lines[:at]) + "\n" + micro + "\n".join(lines[at:]) + "\n"


def confusion_png(labels: list[int], predicted: list[int], names: list[str], title: str) -> bytes:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(labels, predicted, labels=list(range(len(names))), display_labels=names,
                                            ax=ax, colorbar=False, include_values=len(names) <= 20)
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
