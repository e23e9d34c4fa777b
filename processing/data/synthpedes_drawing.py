"""SynthPedes images: one person drawn in flat, well-separated colours with random nuisance (pose,
scale, position, background, lighting, an occluding pole, mirroring) that never hides an attribute."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# The smallest (height, width) the figures can be drawn at (smaller ones leave no room for a limb).
MIN_IMAGE_SIZE = (16, 8)

RGB = {
    "black": (30, 30, 32), "white": (236, 236, 232), "gray": (128, 128, 128), "red": (205, 35, 40),
    "purple": (125, 50, 165), "yellow": (235, 205, 45), "blue": (35, 75, 200), "green": (45, 150, 60),
    "pink": (240, 150, 190), "brown": (120, 72, 35), "blonde": (225, 195, 120),
}
# Kept >= 45 levels away from every clothing colour (a brown leg on brown trousers would hide the type).
SKIN_TONES = ((241, 204, 177), (224, 172, 135), (190, 135, 95))


def _shade(c: Sequence[int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c)  # type: ignore[return-value]


def _stripe_colour(c: Sequence[int]) -> tuple[int, int, int]:
    # Stripes must not change the perceived colour class: darken light colours, lighten dark ones.
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return _shade(c, 0.55) if lum > 100 else tuple(int(v * 0.5 + 110) for v in c)  # type: ignore[return-value]


@dataclass(frozen=True)
class Frame:
    """The canonical 128x64 layout (top of the head at y=8, feet at y=118, bags out to x=8..56) mapped
    to the image by a scale `s` and a shift (`x0`, `y0`); `u`, `v` convert canonical to image pixels."""

    s: float
    x0: float
    y0: float
    u: float
    v: float

    def point(self, x: float, y: float) -> tuple[float, float]:
        return ((self.x0 + (x - 32) * self.s) * self.u, (self.y0 + (y - 8) * self.s) * self.v)

    def box(self, x1: float, y1: float, x2: float, y2: float) -> list[tuple[float, float]]:
        return [self.point(x1, y1), self.point(x2, y2)]

    def poly(self, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.point(x, y) for x, y in points]


def _muted_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> tuple:
    """A random hue at a low saturation (background blocks, ground, pole)."""
    hsv = (rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
    return tuple(int(x) for x in np.array(colorsys.hsv_to_rgb(*hsv)) * 255)


def draw_background(rng: np.random.Generator, frame: Frame, size: tuple[int, int]) -> Image.Image:
    """A muted colour with a vertical gradient, a few muted blocks and a ground band under the feet."""
    H, W = size
    hue, sat, val = rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.75)
    top = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255
    bottom = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.1, 0.1)) % 1, sat, val * rng.uniform(0.7, 1.1))) * 255
    grad = np.linspace(0, 1, H)[:, None, None]
    bg = np.broadcast_to(top * (1 - grad) + bottom * grad, (H, W, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(bg))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        bx, by = rng.uniform(0, W), rng.uniform(0, H * 0.7)
        c = _muted_colour(rng, (0, 0.25), (0.3, 0.8))
        d.rectangle([bx, by, bx + rng.uniform(4, W / 2), by + rng.uniform(4, H / 3)], fill=c)
    ground = frame.y0 + 108 * frame.s
    d.rectangle([0, ground * frame.v, W, H], fill=_muted_colour(rng, (0, 0.2), (0.4, 0.7)))
    return img


def draw_lower_body(d: ImageDraw.ImageDraw, f: Frame, a: dict[str, str | None], skin: tuple, leg: float) -> None:
    """Legs, lower clothing (trousers, shorts or a skirt; y 66..110) and shoes."""
    lower = RGB[a["lower_colour"]]
    left_leg = [(22, 68), (31, 68), (30 - leg, 110), (23 - leg, 110)]
    right_leg = [(33, 68), (42, 68), (41 + leg, 110), (34 + leg, 110)]
    for lg in (left_leg, right_leg):
        d.polygon(f.poly(lg), fill=skin)
    if a["lower_type"] == "trousers":
        for lg in (left_leg, right_leg):
            d.polygon(f.poly(lg), fill=lower)
        d.rectangle(f.box(22, 64, 42, 72), fill=lower)
    elif a["lower_type"] == "shorts":
        d.rectangle(f.box(22, 64, 42, 72), fill=lower)
        for x1, x2, dx in ((22, 31, -leg), (33, 42, leg)):
            d.polygon(f.poly([(x1, 70), (x2, 70), (x2 + dx * 0.4, 86), (x1 + dx * 0.4, 86)]), fill=lower)
    else:  # skirt
        d.polygon(f.poly([(21, 64), (43, 64), (48, 92), (16, 92)]), fill=lower)
    shoe = RGB[a["shoes"]]
    d.ellipse(f.box(20 - leg, 107, 32 - leg, 116), fill=shoe)
    d.ellipse(f.box(32 + leg, 107, 44 + leg, 116), fill=shoe)


def draw_torso_and_head(d: ImageDraw.ImageDraw, f: Frame, a: dict[str, str | None], skin: tuple) -> None:
    """Torso (y 30..66) with its stripes, neck, head, hair and hat."""
    upper = RGB[a["upper_colour"]]
    d.polygon(f.poly([(20, 31), (44, 31), (42, 67), (22, 67)]), fill=upper)
    if a["pattern"] == "striped":
        sc = _stripe_colour(upper)
        for y in range(36, 64, 7):
            d.rectangle(f.box(21, y, 43, y + 2.5), fill=sc)
    d.rectangle(f.box(29, 26, 35, 32), fill=skin)
    d.ellipse(f.box(25, 12, 39, 29), fill=skin)
    hair = RGB[a["hair_colour"]]
    d.chord(f.box(24, 10, 40, 28), 180, 360, fill=hair)
    d.rectangle(f.box(24, 17, 27, 23), fill=hair)
    d.rectangle(f.box(37, 17, 40, 23), fill=hair)
    if a["hat"] != "none":
        hat = RGB[a["hat"]]
        d.chord(f.box(23, 6, 41, 24), 180, 360, fill=hat)
        d.rectangle(f.box(23, 13, 45, 16), fill=hat)


def draw_arms_bag_and_long_hair(d: ImageDraw.ImageDraw, f: Frame, a: dict[str, str | None], skin: tuple,
                                arm: float) -> None:
    """Arms (sleeve colour to the wrist or above the elbow, hands in skin), the bag's straps or handle,
    and long hair over the shoulders, drawn last so that it shows over straps and top."""
    upper = RGB[a["upper_colour"]]
    for x1, x2, dx in ((15, 20.5, -arm), (43.5, 49, arm)):
        d.polygon(f.poly([(x1, 31), (x2, 31), (x2 + dx, 62), (x1 + dx, 62)]), fill=skin)
        end = 62 if a["sleeves"] == "long" else 45
        frac = (end - 31) / 31
        d.polygon(f.poly([(x1, 31), (x2, 31), (x2 + dx * frac, end), (x1 + dx * frac, end)]), fill=upper)
        d.ellipse(f.box(x1 + dx - 0.5, 60, x2 + dx + 0.5, 66), fill=skin)

    bag_c = RGB[a["bag_colour"]] if a["bag"] != "none" else None
    if a["bag"] == "backpack":  # straps over both shoulders
        d.rectangle(f.box(23, 31, 26, 52), fill=bag_c)
        d.rectangle(f.box(38, 31, 41, 52), fill=bag_c)
    elif a["bag"] == "shoulder bag":  # diagonal strap across the chest to a bag at the hip
        d.line(f.poly([(23, 32), (46, 58)]), fill=bag_c, width=max(1, int(round(2.5 * f.s * f.u))))
        d.rectangle(f.box(43, 55, 55, 70), fill=bag_c)
    elif a["bag"] == "handbag":  # hanging from the right hand, no strap
        hx = 46 + arm
        d.rectangle(f.box(hx - 1, 65, hx + 9, 79), fill=bag_c)
        d.line(f.poly([(hx + 1, 65), (hx + 4, 61), (hx + 7, 65)]), fill=bag_c, width=max(1, int(round(1.5 * f.s * f.u))))

    if a["hair_length"] == "long":
        # The shaded edge keeps the strands visible on a top (or background) of the hair's own colour.
        hair = RGB[a["hair_colour"]]
        edge = _stripe_colour(hair)
        d.rectangle(f.box(21.5, 17, 26.5, 46), fill=hair, outline=edge)
        d.rectangle(f.box(37.5, 17, 42.5, 46), fill=hair, outline=edge)


def occlude_mirror_and_light(img: Image.Image, rng: np.random.Generator, u: float) -> Image.Image:
    """Sometimes a narrow pole in front, sometimes mirrored; then a global gain, a slight colour cast
    and sensor noise."""
    H, W = img.height, img.width
    # At most 5 canonical px wide, so the pole never covers a whole attribute region (each region is
    # >= 6 px wide or has a twin on the other side).
    if rng.uniform() < 0.3:
        px = rng.uniform(0, W)
        pw = rng.uniform(2, 4) * u
        ImageDraw.Draw(img).rectangle([px, 0, px + pw, H], fill=_muted_colour(rng, (0, 0.2), (0.2, 0.8)))
    if rng.uniform() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.8, 1.15) * rng.uniform(0.94, 1.06, size=3).astype(np.float32)
    arr = arr * gain + rng.normal(0, 3, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_person(
    attributes: dict[str, str | None], skin: Sequence[int], rng: np.random.Generator, size: tuple[int, int] = (128, 64)
) -> Image.Image:
    """Draws one image of a person with random nuisance.

    The figure is laid out in a canonical 128x64 frame (`Frame`) and mapped to the image by a random
    scale and shift.

    Args:
        attributes: the person's attributes.
        skin: the person's skin tone (a per-person nuisance, not an attribute).
        rng: per-image generator (all nuisance comes from it, in a fixed order).
        size: (H, W) of the output.

    Returns:
        An RGB image.
    """
    H, W = size
    s = rng.uniform(0.8, 1.0)
    x0 = 32 + rng.uniform(-1, 1) * max(0.0, (62 - 48 * s) / 2)
    y0 = rng.uniform(1, max(1.5, 127 - 110 * s))
    frame = Frame(s=s, x0=x0, y0=y0, u=W / 64.0, v=H / 128.0)
    spread = rng.uniform(-1, 1)  # walking phase: legs apart, arms swinging
    leg, arm = 3.0 * spread, 3.0 * spread

    img = draw_background(rng, frame, size)
    d = ImageDraw.Draw(img)
    skin = tuple(skin)
    if attributes["bag"] == "backpack":  # the pack's body shows beside the torso, behind the left arm
        d.rectangle(frame.box(8, 33, 17, 62), fill=RGB[attributes["bag_colour"]])
    draw_lower_body(d, frame, attributes, skin, leg)
    draw_torso_and_head(d, frame, attributes, skin)
    draw_arms_bag_and_long_hair(d, frame, attributes, skin, arm)
    return occlude_mirror_and_light(img, rng, frame.u)
