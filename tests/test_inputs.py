"""Images as users have them: EXIF rotation, alpha, greyscale, palette."""

from __future__ import annotations

from PIL import Image

from maskvl.inputs import load_image


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes())
    assert load_image(str(p)).size == (20, 40)


def test_modes_become_rgb(tmp_path):
    for mode, color in (("RGBA", (0, 0, 0, 0)), ("L", 128), ("P", 3), ("LA", (10, 0)), ("I;16", 300)):
        p = tmp_path / f"{mode.replace(';', '')}.png"
        Image.new(mode, (8, 8), color).save(p)
        im = load_image(str(p))
        assert im.mode == "RGB", mode
    # transparent pixels are composited on white
    assert load_image(str(tmp_path / "RGBA.png")).getpixel((0, 0)) == (255, 255, 255)
