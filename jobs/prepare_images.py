"""Images -> an image dataset artifact of fixed-size uint8 pixels with labels, on Ray Data.

    python -m jobs.prepare_images jobs/configs/prepare_images_digits.yaml [--set source.builtin='' --set source.paths=[DIR]]

Reads folders in the `class_name/*.{png,jpg,jpeg}` layout (local paths, s3://, gs://), or makes the
images on the cluster (`source.builtin`: `digits`, scikit-learn's 1,797 handwritten digits; `glyphs`,
characters rendered from the fonts matplotlib ships, augmented). Decodes, converts the mode,
resizes and centre-crops to `image.size`, splits train / val / test by each file's content hash, and
writes `{storage}/datasets/{name}/` (Parquet shards: `pixels`, `label`, `id`). Files that cannot be
used are counted by reason (actors/prepare_images.py): read = kept + dropped.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from cluster.cli import UserError, format_summary, run_job
from cluster.config import to_dict
from cluster.runtime import JobConfig, connect_job, scoped_attrs
from cluster.storage import Storage, iter_files, resolve

log = logging.getLogger("helio")
BUILTINS = ("digits", "glyphs")


@dataclass(frozen=True)
class GlyphConfig:
    """`source.builtin: glyphs`: every character of `chars` in every shipped font that draws them all,
    `per_font` augmented renderings each."""
    chars: str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    per_font: int = 6
    degrade_to: int = 8  # reduce each rendering to this many pixels a side (the digits'); 0: keep 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError("chars: must be distinct characters, at least one")
        if self.per_font < 1 or self.degrade_to < 0:
            raise ValueError("per_font: must be at least 1, and degrade_to at least 0")


@dataclass(frozen=True)
class ImageSourceConfig:
    paths: tuple[str, ...] = ()  # folders of class_name/ subfolders (local or URIs)
    builtin: str = ""  # digits or glyphs instead of paths
    glyphs: GlyphConfig = field(default_factory=GlyphConfig)

    def __post_init__(self) -> None:
        if bool(self.paths) == bool(self.builtin):
            raise ValueError("paths: name image folders, or builtin: digits or glyphs (one of the two)")
        if self.builtin and self.builtin not in BUILTINS:
            raise ValueError(f"builtin: {self.builtin!r} is not one of {', '.join(BUILTINS)}")


@dataclass(frozen=True)
class ImageConfig:
    size: int = 32  # every image becomes size x size
    channels: int = 1  # 1: greyscale (L), 3: RGB
    min_size: int = 8  # a smaller side is dropped as too_small

    def __post_init__(self) -> None:
        if self.size < 4 or self.channels not in (1, 3) or self.min_size < 1:
            raise ValueError("size: at least 4; channels: 1 or 3; min_size: at least 1")


@dataclass(frozen=True)
class ImageSplitConfig:
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    train_per_class: int = 0  # keep this many train images a class (a few-label finetune); 0: all

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction, test_fraction: non-negative, less than 1 together")
        if self.train_per_class < 0:
            raise ValueError("train_per_class: 0 (all) or positive")


@dataclass(frozen=True)
class PrepareImagesConfig(JobConfig):
    name: str = "images"
    source: ImageSourceConfig = field(default_factory=lambda: ImageSourceConfig(builtin="digits"))
    image: ImageConfig = field(default_factory=ImageConfig)
    split: ImageSplitConfig = field(default_factory=ImageSplitConfig)
    files_per_task: int = 512  # images per read task (and at most per shard)


def list_folder_items(paths: tuple[str, ...]) -> tuple[list[dict], list[str], dict[str, int]]:
    """(items to read: uri and label, class names, files dropped before reading by reason). A file's
    class is its first folder under the root it was found in."""
    from actors.prepare_images import EXTENSIONS

    found: list[tuple[str, str]] = []  # (uri, class or "")
    dropped = {"outside_a_class_folder": 0, "not_an_image_extension": 0}
    for root in paths:
        fs, base = resolve(root)
        if fs.get_file_info(base).type.name == "NotFound":
            raise UserError(f"source.paths: '{root}' does not exist")
        for uri, _ in iter_files(root):
            rel = resolve(uri)[1][len(base.rstrip("/")) + 1:]
            if not uri.lower().endswith(EXTENSIONS):
                dropped["not_an_image_extension"] += 1
            elif "/" not in rel:
                dropped["outside_a_class_folder"] += 1
            else:
                found.append((uri, rel.split("/", 1)[0]))
    classes = sorted({c for _, c in found})
    if not classes:
        raise UserError(f"source.paths {list(paths)} hold no image in a class folder (class_name/*.png|jpg|jpeg); "
                        f"found {dropped}")
    index = {c: i for i, c in enumerate(classes)}
    return [{"uri": u, "label": index[c]} for u, c in found], classes, dropped


def builtin_items(source: ImageSourceConfig) -> tuple[list[dict], list[str]]:
    """(items to make, class names) of a builtin source."""
    from actors.prepare_images import digit_pngs, font_files

    if source.builtin == "digits":
        return ([{"id": i, "label": lb, "font": "", "char": "", "seed": 0, "png": png} for i, lb, png in digit_pngs()],
                [str(d) for d in range(10)])
    g = source.glyphs
    fonts = font_files(g.chars)
    if not fonts:
        raise UserError(f"source.glyphs.chars: no font matplotlib ships draws all of {g.chars!r}")
    items = [{"id": f"{os.path.basename(font)}/{ord(c):04x}/{k}", "label": label, "font": font, "char": c,
              "seed": zlib.crc32(f"{g.seed}/{os.path.basename(font)}/{ord(c)}/{k}".encode()), "png": b""}
             for font in fonts for label, c in enumerate(g.chars) for k in range(g.per_font)]
    return items, list(g.chars)


def run(cfg: PrepareImagesConfig) -> dict[str, Any]:
    """Runs the whole job; returns the artifact's manifest."""
    import ray.data

    store = Storage(cfg.storage)
    store.artifact_path("dataset", cfg.name)  # validates the name before any work
    if cfg.source.paths:
        items, classes, dropped_early = list_folder_items(cfg.source.paths)
    else:
        (items, classes), dropped_early = builtin_items(cfg.source), {}
    connect_job(cfg)
    ctx = ray.data.DataContext.get_current()
    with scoped_attrs(ctx.execution_options, preserve_order=True):
        return build(cfg, store, items, classes, dropped_early)


def build(cfg: PrepareImagesConfig, store: Storage, items: list[dict], classes: list[str],
          dropped_early: dict[str, int]) -> dict[str, Any]:
    import ray.data

    from actors import prepare_images as udf

    t0 = time.time()
    image, split = to_dict(cfg.image), to_dict(cfg.split)
    blocks = max(1, -(-len(items) // cfg.files_per_task))
    log.info("[1/3] decode %d images into %dx%dx%d in %d tasks", len(items), cfg.image.size, cfg.image.size,
             cfg.image.channels, blocks)
    source = ray.data.from_items(items, override_num_blocks=blocks)
    decoded = (source.map_batches(udf.read_images, batch_size=cfg.files_per_task,
                                  fn_kwargs={"image": image, "split": split}) if cfg.source.paths else
               source.map_batches(udf.made_images, batch_size=cfg.files_per_task,
                                  fn_kwargs={"image": image, "split": split, "glyphs": to_dict(cfg.source.glyphs)})
               ).materialize()
    meta = decoded.select_columns(["id", "label", "split", "reason", "converted"]).to_pandas()
    dropped = dict(dropped_early) | meta.loc[meta.reason != "", "reason"].value_counts().to_dict()
    converted = meta.loc[meta.converted != "", "converted"].value_counts().to_dict()
    kept = meta[meta.reason == ""]
    limited: list[str] = []
    if cfg.split.train_per_class:  # the first n of each class by id (ids are sorted paths or stable names)
        train = kept[kept.split == "train"].sort_values("id")
        over = train.groupby("label").cumcount() >= cfg.split.train_per_class
        limited = train.loc[over, "id"].tolist()
        dropped["train_per_class_limit"] = len(limited)
    read = len(meta) + sum(dropped_early.values())
    if len(kept) == len(limited):
        raise UserError(f"none of the {read} images read could be used: dropped {dropped}")

    with store.create("dataset", cfg.name, config=to_dict(cfg)) as art:
        log.info("[2/3] write shards")
        pixel_bytes = cfg.image.size * cfg.image.size * cfg.image.channels
        skip = set(limited)
        stats = decoded.map_batches(udf.write_shard, batch_size=cfg.files_per_task,
                                    fn_kwargs={"out_uri": art.tmp_uri, "pixel_bytes": pixel_bytes,
                                               "skip": sorted(skip)}).take_all()
        art.add_files({s["file"]: {"sha256": s["sha256"], "bytes": int(s["bytes"])} for s in stats})
        written = sum(int(s["images"]) for s in stats)
        if read != written + sum(dropped.values()):
            raise RuntimeError(f"image accounting broke: read {read} != kept {written} + dropped {dropped}")
        log.info("[3/3] commit the artifact")
        final = kept[~kept.id.isin(skip)]
        splits = {s: {"images": int((final.split == s).sum()),
                      "per_class": {classes[int(k)]: int(v) for k, v in
                                    final[final.split == s].label.value_counts().sort_index().items()},
                      "shards": sorted(x["file"] for x in stats if x["split"] == s)}
                  for s in ("train", "val", "test")}
        elapsed = time.time() - t0
        art.metrics = {"records": {"read": read, "kept": written, "dropped": {k: int(v) for k, v in sorted(dropped.items())}},
                       "converted": {k: int(v) for k, v in sorted(converted.items())},
                       "seconds": round(elapsed, 2), "images_per_s": round(read / max(elapsed, 1e-9), 1)}
        art.extra = {"images": {"size": cfg.image.size, "channels": cfg.image.channels, "classes": classes,
                                "source": list(cfg.source.paths) or [f"<builtin {cfg.source.builtin}>"],
                                "splits": splits}}
    artifact = store.open("dataset", cfg.name, verify=False)
    print(summary_table(artifact.manifest, artifact.uri))
    return artifact.manifest


def summary_table(m: dict[str, Any], uri: str) -> str:
    rec, img = m["metrics"]["records"], m["images"]
    rows = [("images read", f"{rec['read']:,}"), ("images kept", f"{rec['kept']:,}")]
    rows += [(f"  dropped: {reason}", f"{n:,}") for reason, n in rec["dropped"].items() if n]
    rows += [(f"  converted: {kind}", f"{n:,}") for kind, n in m["metrics"]["converted"].items()]
    rows += [(f"{s} images / shards", f"{v['images']:,} / {len(v['shards'])}") for s, v in img["splits"].items()]
    rows += [("classes", f"{len(img['classes'])}"), ("image", f"{img['size']}x{img['size']}x{img['channels']}"),
             ("time", f"{m['metrics']['seconds']:.1f} s ({m['metrics']['images_per_s']:.0f} images/s)"),
             ("artifact", uri)]
    return format_summary("prepare_images summary", rows)


CONFIG_CLASS = PrepareImagesConfig  # what jobs/configs/prepare_images_*.yaml must load into


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.prepare_images", __doc__, PrepareImagesConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
