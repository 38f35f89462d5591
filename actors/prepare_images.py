"""Ray Data UDFs of jobs.prepare_images: image files, or images made on the cluster, -> fixed-size uint8
pixels with a label and a split; every file that cannot be used is counted by reason. A shard's
`pixels` column is a fixed-size list of H*W*C uint8 (row-major, channels last), which the training
loop reads as one (rows, H*W*C) array.

A file is decoded with Pillow and checked in this order, the first failure naming its reason:
`empty_file` (zero bytes), `not_an_image` (Pillow cannot identify it, whatever its extension),
`truncated` (the data ends early: a cut JPEG or PNG), `corrupt` (identified but undecodable),
`too_small` (a side under `min_size`). What decodes is converted, never dropped: 16-bit greyscale
is scaled to 8 bits (Pillow's own conversion clips it at 255), CMYK and palette images go to RGB,
transparency is composited onto black (the glyphs' and digits' background); those conversions are
counted too. Then the shorter side is resized to `size` (antialiased) and the centre cropped.

The split is a function of the file's bytes (sha256), so it is the same on any cluster and identical
copies of an image always share a split.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from typing import Any

import numpy as np

DROP_REASONS = ("empty_file", "not_an_image", "truncated", "corrupt", "too_small", "outside_a_class_folder",
                "not_an_image_extension", "unreadable", "train_per_class_limit")
EXTENSIONS = (".png", ".jpg", ".jpeg")


def decode(raw: bytes, size: int, channels: int, min_size: int) -> tuple[np.ndarray | None, str, str]:
    """(pixels (size, size, channels) uint8 or None, drop reason or "", conversion made or "")."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        return None, "empty_file", ""
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except UnidentifiedImageError:
        return None, "not_an_image", ""
    except Exception as e:  # noqa: BLE001 - whatever Pillow or a decoder raises on bad data
        # Pillow's words for data that ends early, in the header or the pixels: "image file is truncated",
        # "Truncated File Read" (JPEG), "broken data stream" (PNG)
        cut = any(w in str(e).lower() for w in ("truncated", "broken data stream"))
        return None, "truncated" if cut else "corrupt", ""
    if min(im.size) < min_size:
        return None, "too_small", ""
    im, converted = to_mode(im, "L" if channels == 1 else "RGB")
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR,
                   reducing_gap=None)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    pixels = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return pixels.reshape(size, size, channels), "", converted


def to_mode(im: Any, mode: str) -> tuple[Any, str]:
    """`im` in mode L or RGB, and which conversion that took ("" for none a reader would care about)."""
    from PIL import Image

    converted = ""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16 (or 32) bits a sample: scale, do not clip
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        im, converted = Image.fromarray(np.round(arr * 255.0 / top).astype(np.uint8)), "16bit"
    elif im.mode == "CMYK":
        im, converted = im.convert("RGB"), "cmyk"
    elif im.mode in ("P", "PA"):
        im, converted = im.convert("RGBA"), "palette"
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
        converted = converted or "alpha"
    return im.convert(mode) if im.mode != mode else im, converted


def split_of(digest: bytes, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def _rows(items: list[tuple[str, int, bytes | None]], image: dict, split: dict) -> dict[str, np.ndarray]:
    """(id, label, raw bytes or None when unreadable) -> one row each: pixels (empty when dropped), label,
    split, reason, conversion, sha256 of the bytes."""
    out: dict[str, list] = {k: [] for k in ("id", "label", "pixels", "split", "reason", "converted", "sha256")}
    for ident, label, raw in items:
        if raw is None:
            pixels, reason, converted = None, "unreadable", ""
        else:
            pixels, reason, converted = decode(raw, image["size"], image["channels"], image["min_size"])
        digest = hashlib.sha256(raw or b"").digest()
        out["id"].append(ident)
        out["label"].append(label)
        out["pixels"].append(b"" if pixels is None else pixels.tobytes())
        out["split"].append(split_of(digest, split["val_fraction"], split["test_fraction"]))
        out["reason"].append(reason)
        out["converted"].append(converted)
        out["sha256"].append(digest.hex())
    return {k: np.array(v, dtype=np.int64 if k == "label" else object) for k, v in out.items()}


def read_images(batch: dict[str, np.ndarray], image: dict, split: dict) -> dict[str, np.ndarray]:
    """Rows of (uri, label) -> decoded rows."""
    from cluster.storage import resolve

    items = []
    for uri, label in zip(batch["uri"], batch["label"]):
        try:
            fs, path = resolve(str(uri))
            with fs.open_input_stream(path, compression=None) as f:
                raw = f.readall()
        except OSError:
            raw = None
        items.append((str(uri), int(label), raw))
    return _rows(items, image, split)


def made_images(batch: dict[str, np.ndarray], image: dict, split: dict, glyphs: dict) -> dict[str, np.ndarray]:
    """Rows of (id, label, font, char, seed) from jobs.prepare_images' builtin sources -> decoded rows:
    the digits' PNGs, or glyphs rendered here (the generation runs on the cluster, in parallel)."""
    items = []
    for ident, label, font, char, seed, png in zip(batch["id"], batch["label"], batch["font"], batch["char"],
                                                   batch["seed"], batch["png"]):
        raw = png if len(png) else render_glyph(str(font), str(char), int(seed), glyphs)
        items.append((str(ident), int(label), raw))
    return _rows(items, image, split)


def render_glyph(font_path: str, char: str, seed: int, glyphs: dict) -> bytes:
    """One augmented rendering of `char` in a font, white on black, as PNG bytes: a random size (0.55-0.9
    of the canvas), rotation (+-12 degrees), shear, offset and stroke; then the ink's bounding box is
    stretched to `degrade_to` pixels a side (the handwritten digits were normalised into their 8 x 8
    frame the same way), so the pretraining images look like what is finetuned on."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    canvas = 64
    font = ImageFont.truetype(font_path, size=int(canvas * rng.uniform(0.55, 0.9)))
    im = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-4, 4)
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-4, 4)
    draw.text((x, y), char, fill=255, font=font, stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    shear = rng.uniform(-0.2, 0.2)
    im = im.transform(im.size, Image.Transform.AFFINE, (1, shear, -shear * canvas / 2, 0, 1, 0),
                      resample=Image.Resampling.BILINEAR)
    im = im.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
    box = im.getbbox()
    if box is not None and glyphs["degrade_to"]:  # the ink's box, stretched to the frame as the digits were
        im = im.crop(box).resize((glyphs["degrade_to"],) * 2, Image.Resampling.BOX)
    elif box is not None:  # the ink's square box with a margin
        cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, max(box[2] - box[0], box[3] - box[1]) * 0.6
        im = im.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def font_files(chars: str) -> list[str]:
    """The TrueType fonts matplotlib ships that draw every one of `chars` as itself, sorted. A font's
    character map is not enough: TeX's symbol fonts map 'A' and '0' to other glyphs (cmex10's '0' is
    parenlefttp), so each glyph's name must be the character's Adobe Glyph List name (or uniXXXX)."""
    import matplotlib
    from fontTools.agl import UV2AGL
    from fontTools.ttLib import TTFont

    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    out = []
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(".ttf"):
            cmap = TTFont(os.path.join(folder, name), lazy=True)["cmap"].getBestCmap() or {}
            if all(cmap.get(ord(c)) in (UV2AGL.get(ord(c)), f"uni{ord(c):04X}") for c in chars):
                out.append(os.path.join(folder, name))
    return out


def digit_pngs() -> list[tuple[str, int, bytes]]:
    """scikit-learn's 1,797 handwritten digits (8 x 8, 17 grey levels), as (id, label, PNG bytes)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        buf = io.BytesIO()
        Image.fromarray(np.round(img * 255.0 / 16.0).astype(np.uint8)).save(buf, format="PNG")
        out.append((f"digits/{int(label)}/{i:04d}.png", int(label), buf.getvalue()))
    return out


def write_shard(batch: dict[str, np.ndarray], out_uri: str, pixel_bytes: int, skip: list[str]) -> dict[str, np.ndarray]:
    """Decoded rows -> the kept ones (no drop reason, not in `skip`) as one Parquet shard per split, rows
    in sha256 order, named by the first; the shards' manifest entries and counts."""
    import pyarrow as pa

    from cluster.storage import write_parquet_file

    kept = (batch["reason"] == "") & ~np.isin(batch["id"].astype(str), np.asarray(skip, dtype=str))
    rows: dict[str, list] = {k: [] for k in ("file", "split", "sha256", "bytes", "images")}
    for split in ("train", "val", "test"):
        pick = np.flatnonzero((batch["split"] == split) & kept)
        if not len(pick):
            continue
        pick = pick[np.argsort(batch["sha256"][pick], kind="stable")]
        rel = f"{split}/shard-{batch['sha256'][pick[0]][:16]}.parquet"
        flat = np.frombuffer(b"".join(batch["pixels"][i] for i in pick), dtype=np.uint8)
        table = pa.table({"pixels": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint8()), pixel_bytes),
                          "label": pa.array(batch["label"][pick].astype(np.int32), pa.int32()),
                          "id": pa.array([str(batch["id"][i]) for i in pick], pa.string())})
        entry = write_parquet_file(posixpath.join(out_uri, rel), table)
        for key, value in (("file", rel), ("split", split), ("sha256", entry["sha256"]), ("bytes", entry["bytes"]),
                           ("images", len(pick))):
            rows[key].append(value)
    return {k: np.array(v, dtype=np.int64 if k in ("bytes", "images") else object) for k, v in rows.items()}
