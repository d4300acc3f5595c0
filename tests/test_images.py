"""The bad-input zoo: every kind of damaged or unusual image file either becomes correct RGB or a BadImage."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from embeddings.images import BadImage, is_image_path, load_rgb, to_rgb


def _noise(h=48, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _reason(path, **kwargs) -> str:
    with pytest.raises(BadImage) as info:
        load_rgb(path, **kwargs)
    assert str(path) in str(info.value)  # the message names the file; .reason is the short record
    return info.value.reason


# ------------------------------------------------------------------------------------------- bad files


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert _reason(p) == "zero bytes"


def test_missing_file_and_folder(tmp_path):
    assert _reason(tmp_path / "gone.png") == "file not found"
    (tmp_path / "dir.png").mkdir()
    assert _reason(tmp_path / "dir.png") == "not a regular file"


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.95])
def test_truncated_files(tmp_path, fmt, suffix, keep):
    data = _encoded(Image.fromarray(_noise()), fmt)
    p = tmp_path / f"cut{suffix}"
    p.write_bytes(data[: int(len(data) * keep)])
    assert _reason(p) == "truncated file"


def test_text_file_with_image_extension(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n" * 20)
    assert _reason(p) == "not an image"


def test_garbage_bytes_after_a_valid_header_are_corrupt_not_a_crash(tmp_path):
    data = bytearray(_encoded(Image.fromarray(_noise()), "PNG"))
    data[60:] = bytes(len(data) - 60)  # zero the compressed stream, keep the header
    p = tmp_path / "zeroed.png"
    p.write_bytes(bytes(data))
    reason = _reason(p)
    assert reason == "truncated file" or reason.startswith("corrupt image")


def test_decompression_bomb_by_argument(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 50), (1, 2, 3)).save(p)
    assert _reason(p, max_pixels=4999) == "decompression bomb (5000 pixels)"
    assert load_rgb(p, max_pixels=5000).size == (100, 50)
    assert load_rgb(p, max_pixels=0).size == (100, 50)  # non-positive disables the check


# Pillow warns as it opens such an image, before load_rgb refuses it (and records the skip): the refusal is
# what this test checks, so the warning is expected.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_by_pillow_limit(tmp_path, monkeypatch):
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; load_rgb refuses from MAX_IMAGE_PIXELS up.
    p = tmp_path / "big.png"
    Image.new("L", (60, 60)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3600 pixels: in Pillow's warning band
    assert _reason(p) == "decompression bomb (3600 pixels)"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3600 pixels: past Pillow's error threshold too
    assert _reason(p) == "decompression bomb (3600 pixels)"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    assert load_rgb(p).size == (60, 60)


# ------------------------------------------------------------------------------------------- conversions


def _load(tmp_path, img: Image.Image, name: str, **save) -> np.ndarray:
    p = tmp_path / name
    img.save(p, **save)
    out = load_rgb(p)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_rgb_png_is_returned_exactly(tmp_path):
    a = _noise()
    np.testing.assert_array_equal(_load(tmp_path, Image.fromarray(a), "x.png"), a)


def test_greyscale_is_replicated(tmp_path):
    g = _noise()[..., 0]
    out = _load(tmp_path, Image.fromarray(g), "g.png")
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_one_bit_image(tmp_path):
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 0), 1)
    out = _load(tmp_path, img, "bw.png")
    assert out[0, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def _palette_image() -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    return img


def test_palette_without_transparency(tmp_path):
    out = _load(tmp_path, _palette_image(), "p.png")
    assert out[0].tolist() == [[10, 20, 30], [200, 100, 0], [0, 0, 255]]


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_transparency_is_white(tmp_path, fmt):
    out = _load(tmp_path, _palette_image(), f"pt.{fmt}", transparency=1)
    assert out[0].tolist() == [[10, 20, 30], [255, 255, 255], [0, 0, 255]]


def test_rgba_is_composited_on_white(tmp_path):
    a = np.array([[[200, 40, 0, 255], [200, 40, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    out = _load(tmp_path, Image.fromarray(a, "RGBA"), "a.png").astype(int)
    assert out[0, 0].tolist() == [200, 40, 0]  # opaque: unchanged
    assert out[0, 1].tolist() == [255, 255, 255]  # transparent: white, not the hidden colour
    assert np.all(np.abs(out[0, 2] - 127) <= 1)  # half-transparent black over white: mid grey


def test_la_is_composited_on_white(tmp_path):
    a = np.array([[[0, 255], [0, 0], [90, 255]]], dtype=np.uint8)
    out = _load(tmp_path, Image.fromarray(a, "LA"), "la.png")
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255], [90, 90, 90]]


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink-free on magenta+yellow: red
    p = tmp_path / "cmyk.jpg"
    img.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = np.asarray(load_rgb(p)).astype(int)
    assert np.all(np.abs(out - np.array([255, 0, 0])) <= 6)


@pytest.mark.parametrize("value,expected", [(0, 0), (257, 1), (32896, 128), (65535, 255), (200, 1)])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, value, expected):
    a = np.full((3, 5), value, dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    out = np.asarray(load_rgb(p))
    assert out.shape == (3, 5, 3) and np.all(out == expected)


def test_32_bit_integer_and_float_modes():
    i32 = Image.fromarray(np.array([[-5, 0, 65535, 100000]], dtype=np.int32))
    assert i32.mode == "I"
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 0, 255, 255]
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(f01))[0, :, 0].tolist() == [0, 128, 255]
    f255 = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert np.asarray(to_rgb(f255))[0, :, 0].tolist() == [0, 100, 255]


def test_image_extensions_are_case_insensitive():
    assert is_image_path("a/B.JPG") and is_image_path("x.Jpeg") and is_image_path("y.webp")
    assert not is_image_path("notes.txt") and not is_image_path("noext")


@settings(max_examples=20, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12), st.just(3))),
       st.sampled_from(["png", "bmp", "tiff", "ppm"]))
def test_lossless_formats_round_trip_exactly(tmp_path_factory, a, fmt):
    p = tmp_path_factory.mktemp("rt") / f"x.{fmt}"
    Image.fromarray(a).save(p)
    np.testing.assert_array_equal(np.asarray(load_rgb(p)), a)
