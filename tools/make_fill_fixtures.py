"""Reference for `latent`'s inpainting "fill" (src/pipeline/image/fill.rs): AUTOMATIC1111's
"Masked content: fill" computed with PIL, which is what AUTOMATIC1111 runs it with.

Writes tests/fixtures/img2img/fill-image.png (a 96x64 picture with gradients and edges),
fill-mask.png (a rectangle and a disc, blurred by PIL's GaussianBlur(4) as AUTOMATIC1111's
mask_blur 4 does) and fill-pil.png (the filled picture).

The fill: the kept part of the picture (alpha = 255 - mask) in premultiplied form is blurred
at radii 256, 64, 16, 4, 2 and 0 (no blur), and each blurred layer, back in straight alpha,
is composited over the result 1, 1, 2, 4, 2 and 1 times; the result's RGB is the picture.

Run from the repository root: "${PYTHON:-python3}" tools/make_fill_fixtures.py
"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageOps

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "img2img"
W, H = 96, 64


def picture():
    img = Image.new("RGB", (W, H))
    px = img.load()
    for y in range(H):
        for x in range(W):
            px[x, y] = (int(255 * x / (W - 1)), int(255 * y / (H - 1)), 90)
    draw = ImageDraw.Draw(img)
    draw.rectangle((60, 8, 90, 30), fill=(20, 200, 40))
    draw.line((0, 50, 95, 40), fill=(250, 250, 250), width=3)
    return img


def mask():
    m = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(m)
    draw.rectangle((20, 12, 52, 44), fill=255)
    draw.ellipse((66, 30, 90, 54), fill=255)
    return m.filter(ImageFilter.GaussianBlur(4))


def fill(image, m):
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(m))
    result = Image.new("RGBA", image.size)
    for radius, times in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            result.alpha_composite(layer)
    return result.convert("RGB")


def main():
    image, m = picture(), mask()
    image.save(OUT / "fill-image.png")
    m.save(OUT / "fill-mask.png")
    fill(image, m).save(OUT / "fill-pil.png")


if __name__ == "__main__":
    main()
