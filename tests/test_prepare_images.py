"""jobs.prepare_images: decoding and conversion of every kind of file a folder of images holds, the
accounting (read = kept + dropped), content-hash splits, and the builtin digits and glyphs."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.prepare_images import decode, digit_pngs, font_files, render_glyph, split_of
from cluster.storage import Storage
from jobs import prepare_images

CONFIG = "jobs/configs/prepare_images_digits.yaml"


def png(arr: np.ndarray) -> bytes:
    """PNG bytes of an array: uint8 (H, W) greyscale, (H, W, 4) RGBA; uint16 (H, W) 16-bit greyscale."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


GRADIENT = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 32 x 32, columns 0..248


def test_each_bad_file_has_its_reason_and_conversions_keep_the_picture():
    assert decode(b"", 32, 1, 8)[1] == "empty_file"
    assert decode(b"def f():\n    return 1\n" * 20, 32, 1, 8)[1] == "not_an_image"
    whole = jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    assert decode(whole, 32, 1, 8)[1] == ""
    assert decode(whole[: len(whole) // 2], 32, 1, 8)[1] == "truncated"
    assert decode(png(GRADIENT[:4, :4]), 32, 1, 8)[1] == "too_small"

    same, reason, converted = decode(png(GRADIENT), 32, 1, 8)
    assert reason == converted == "" and np.array_equal(same[..., 0], GRADIENT)  # the right size: untouched
    # 16 bits a sample: scaled to 8 (Pillow's own conversion would clip everything over 255 to white)
    deep = (GRADIENT.astype(np.uint16) * 257)
    pixels, reason, converted = decode(png(deep), 32, 1, 8)
    assert (reason, converted) == ("", "16bit")
    assert np.abs(pixels[..., 0].astype(int) - GRADIENT).max() <= 1
    # CMYK: converted to RGB, a grey ramp stays a grey ramp
    cmyk = Image.fromarray(np.stack([GRADIENT] * 3, -1)).convert("CMYK")
    pixels, reason, converted = decode(jpeg(cmyk), 32, 3, 8)
    assert (reason, converted) == ("", "cmyk") and pixels.shape == (32, 32, 3)
    assert np.abs(pixels.astype(int) - GRADIENT[..., None]).mean() < 8  # JPEG's own error, a few levels
    # transparency composited onto black: a transparent white pixel is background
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:8, :, 3] = 255  # top half opaque white, bottom half transparent white
    pixels, _, converted = decode(png(rgba), 16, 1, 8)
    assert converted == "alpha" and pixels[:8].min() == 255 and pixels[8:].max() == 0


def test_resizing_scales_the_shorter_side_and_crops_the_centre():
    wide = np.zeros((16, 64), np.uint8)
    wide[:, 24:40] = 255  # a white square in the middle of a 4:1 strip
    pixels = decode(png(wide), 16, 1, 8)[0][..., 0]
    assert pixels.shape == (16, 16) and pixels.min() == 255  # the centre is all that is left
    small = decode(png(np.full((8, 8), 77, np.uint8)), 32, 1, 8)[0]
    assert small.shape == (32, 32, 1) and (small == 77).all()  # upscaling keeps a flat image flat


def test_splits_follow_the_content_hash():
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(4000)]
    splits = [split_of(d, 0.1, 0.2) for d in digests]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    # 4,000 draws: each share within 4 standard deviations of its fraction
    for s, p in (("val", 0.1), ("test", 0.2), ("train", 0.7)):
        assert abs(share[s] - p) < 4 * (p * (1 - p) / len(splits)) ** 0.5, share
    assert splits == [split_of(d, 0.1, 0.2) for d in digests]


def test_builtin_sources_are_offline_and_render_every_class():
    digits = digit_pngs()
    assert len(digits) == 1797 and sorted({lb for _, lb, _ in digits}) == list(range(10))
    fonts = font_files("0123456789ABCabc")
    assert len(fonts) >= 10 and not any(symbols in f for f in fonts for symbols in ("cmex10", "cmsy10", "STIXSize"))
    a = render_glyph(fonts[0], "A", 1, {"degrade_to": 8})
    b = render_glyph(fonts[0], "A", 2, {"degrade_to": 8})
    assert Image.open(io.BytesIO(a)).size == (8, 8) and a != b  # another seed, another rendering
    assert a == render_glyph(fonts[0], "A", 1, {"degrade_to": 8})
    ink = decode(a, 32, 1, 8)[0]
    assert ink.max() > 128 and ink.min() < 32  # a bright glyph on a dark background, like the digits
    assert not np.array_equal(ink, decode(render_glyph(fonts[0], "0", 1, {"degrade_to": 8}), 32, 1, 8)[0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of real digit images plus every kind of bad file, as a user's folder would hold."""
    root = tmp_path_factory.mktemp("images")
    by_label: dict[int, list[bytes]] = {}
    for _, label, data in digit_pngs():
        by_label.setdefault(label, []).append(data)
    for label, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (root / name).mkdir()
        for i, data in enumerate(by_label[label][:40]):
            (root / name / f"{i:03d}.png").write_bytes(data)
    one = root / "one"
    (one / "empty.png").write_bytes(b"")
    (one / "notes.jpg").write_text("not a picture\n")
    cut = jpeg(Image.fromarray(GRADIENT))
    (one / "cut.jpg").write_bytes(cut[: len(cut) // 2])
    (one / "tiny.png").write_bytes(png(GRADIENT[:3, :3]))
    (one / "deep.png").write_bytes(png(GRADIENT.astype(np.uint16) * 257))
    (one / "print.jpeg").write_bytes(jpeg(Image.fromarray(np.stack([GRADIENT] * 3, -1)).convert("CMYK")))
    (one / "README.txt").write_text("labels by folder\n")
    (root / "loose.png").write_bytes(by_label[2][0])  # no class folder
    return root


@pytest.mark.ray
def test_a_folder_becomes_shards_with_every_file_accounted_for(ray_cluster, folder, tmp_path):
    code = prepare_images.main([CONFIG, "--set", f"storage={tmp_path}", "--set", "name=folder",
                                "--set", f"source.paths=[{folder}]", "--set", "source.builtin=''",
                                "--set", "split.val_fraction=0.1", "--set", "split.test_fraction=0.1",
                                "--set", "split.train_per_class=20", "--set", "files_per_task=16"])
    assert code == 0
    art = Storage(str(tmp_path)).open("dataset", "folder")
    records = art.metrics["records"]
    assert records["read"] == 3 * 40 + 7 + 1 == records["kept"] + sum(records["dropped"].values())
    train_limit = records["dropped"].pop("train_per_class_limit")
    assert records["dropped"] == {"empty_file": 1, "not_an_image": 1, "truncated": 1, "too_small": 1,
                                  "outside_a_class_folder": 1, "not_an_image_extension": 1}
    assert art.metrics["converted"] == {"16bit": 1, "cmyk": 1}
    images = art.manifest["images"]
    assert images["classes"] == ["one", "seven", "zero"] and (images["size"], images["channels"]) == (32, 1)
    train = images["splits"]["train"]
    assert all(n == 20 for n in train["per_class"].values()), train  # 40 a class, ~80% of it train: cut to 20
    assert records["kept"] + train_limit == 3 * 40 + 2  # every decodable file, before the few-label cut

    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    seen = 0
    for split, info in images["splits"].items():
        rows = 0
        for rel in info["shards"]:
            table = pq.read_table(art.file_uri(rel)).to_pylist()
            rows += len(table)
            for row in table:
                raw = files[row["id"][len(str(folder)) + 1:]]
                assert split_of(hashlib.sha256(raw).digest(), 0.1, 0.1) == split
                expected = decode(raw, 32, 1, 8)[0]
                assert bytes(row["pixels"]) == expected.tobytes()  # what the job stored is what decoding the file gives
                assert images["classes"][row["label"]] == row["id"][len(str(folder)) + 1:].split("/")[0]
                seen += 1
        assert rows == info["images"]
    assert seen == records["kept"]


def test_a_config_naming_both_or_neither_source_is_refused(tmp_path, capsys):
    assert prepare_images.main([CONFIG, "--set", f"storage={tmp_path}", "--set", f"source.paths=[{tmp_path}]",
                                "--set", "source.builtin=digits"]) == 2
    assert "config key 'source.paths': name image folders, or builtin: digits or glyphs" in capsys.readouterr().err
    assert prepare_images.main([CONFIG, "--set", f"storage={tmp_path}", "--set", "source.builtin=cifar"]) == 2
    assert "'cifar' is not one of digits, glyphs" in capsys.readouterr().err
    assert prepare_images.main([CONFIG, "--set", f"storage={tmp_path}", "--set", "source.builtin=''",
                                "--set", f"source.paths=[{tmp_path}/nope]"]) == 2
    assert f"source.paths: '{tmp_path}/nope' does not exist" in capsys.readouterr().err
