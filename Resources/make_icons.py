"""Draws the module and extension icons (128x128 PNG). Run: python Resources/make_icons.py

Colours are the classes' Slicer colours: CSF (85,188,255), grey matter (200,200,235),
white matter (250,250,210), lesion/mass (144,238,144).
"""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
S = 4  # supersampling, then downscale for smooth edges
CSF, GREY, WHITE, LESION = (85, 188, 255), (200, 200, 235), (250, 250, 210), (144, 238, 144)
BACK, EDGE = (29, 53, 87), (18, 33, 56)


def base() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGBA", (128 * S, 128 * S), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((4 * S, 4 * S, 124 * S, 124 * S), radius=22 * S, fill=BACK, outline=EDGE, width=3 * S)
    return img, d


def _blob(cx, cy, rx, ry, wobble, lobes, phase=0.0, n=240):
    """An ellipse whose radius ripples: gyri when wobble > 0."""
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        r = 1.0 + wobble * math.sin(lobes * t + phase)
        pts.append(((cx + rx * r * math.cos(t)) * S, (cy + ry * r * math.sin(t)) * S))
    return pts


def _rotated_ellipse(cx, cy, rx, ry, angle, n=90):
    a = math.radians(angle)
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append(((cx + x * math.cos(a) - y * math.sin(a)) * S, (cy + x * math.sin(a) + y * math.cos(a)) * S))
    return pts


def brain(d: ImageDraw.ImageDraw, cx: float, cy: float, scale: float) -> None:
    """An axial brain slice in the classes' colours: CSF rim, folded cortex, white matter, ventricles, a lesion."""
    d.polygon(_blob(cx, cy, 42 * scale, 50 * scale, 0.0, 1), fill=CSF)
    d.polygon(_blob(cx, cy, 39 * scale, 47 * scale, 0.035, 22), fill=GREY)
    d.polygon(_blob(cx, cy, 29 * scale, 37 * scale, 0.07, 14, 0.6), fill=WHITE)
    for side in (-1, 1):  # butterfly-shaped lateral ventricles
        d.polygon(_rotated_ellipse(cx + side * 7 * scale, cy - 3 * scale, 3.6 * scale, 13 * scale, side * 14), fill=CSF)
    # interhemispheric fissure, front and back
    w = max(1, int(3 * S * scale))
    d.line((cx * S, (cy - 50 * scale) * S, cx * S, (cy - 33 * scale) * S), fill=CSF, width=w)
    d.line((cx * S, (cy + 37 * scale) * S, cx * S, (cy + 50 * scale) * S), fill=CSF, width=w)
    r = 6.5 * scale
    lx, ly = cx + 17 * scale, cy - 20 * scale
    d.ellipse(((lx - r) * S, (ly - r) * S, (lx + r) * S, (ly + r) * S), fill=LESION)


def finish(img: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.resize((128, 128), Image.LANCZOS).save(path)


def segment_icon(path: str) -> None:
    img, d = base()
    brain(d, 64, 66, 1.0)
    finish(img, path)


def train_icon(path: str) -> None:
    img, d = base()
    brain(d, 52, 60, 0.72)
    # three sites joined to a hub: federation / adaptation
    hub = (94 * S, 92 * S)
    sites = [(106 * S, 30 * S), (114 * S, 64 * S), (70 * S, 114 * S)]
    for sx, sy in sites:
        d.line((hub[0], hub[1], sx, sy), fill=(255, 255, 255), width=3 * S)
    for sx, sy in sites:
        d.ellipse((sx - 8 * S, sy - 8 * S, sx + 8 * S, sy + 8 * S), fill=LESION, outline=(255, 255, 255), width=2 * S)
    d.ellipse((hub[0] - 11 * S, hub[1] - 11 * S, hub[0] + 11 * S, hub[1] + 11 * S), fill=(255, 196, 61),
              outline=(255, 255, 255), width=2 * S)
    finish(img, path)


def extension_icon(path: str) -> None:
    img, d = base()
    brain(d, 58, 60, 0.95)
    # a "U" badge
    cx, cy, r = 98, 98, 21
    d.ellipse(((cx - r) * S, (cy - r) * S, (cx + r) * S, (cy + r) * S), fill=(255, 196, 61), outline=(255, 255, 255), width=3 * S)
    font = ImageFont.load_default(size=30 * S)
    d.text((cx * S, (cy + 1) * S), "U", font=font, fill=BACK, anchor="mm")
    finish(img, path)


if __name__ == "__main__":
    segment_icon(os.path.join(REPO, "UHarmonySegment", "Resources", "Icons", "UHarmonySegment.png"))
    train_icon(os.path.join(REPO, "UHarmonyTrain", "Resources", "Icons", "UHarmonyTrain.png"))
    extension_icon(os.path.join(HERE, "UHarmony.png"))
