"""Synthetic top-down SEM images of the 8 taxonomy classes: the project's embedded default data.

    python -m train synth --out DIR [--per-class N] [--seed S] [--size 128] [--contact-sheet PNG]

Writes DIR/<class>/<class>_NNNN.png (8-bit grayscale). The same seed gives byte-identical files: each
image draws from its own generator seeded by (seed, class index, image index), so image i of a class
does not depend on --per-class.

How an image is made (all geometry in "128-pixel units", scaled to --size):
  1. scene: a line/space grating (LER, varying pitch/duty) or a contact/via array (holes or pillars,
     square or staggered), drawn anti-aliased as a material mask;
  2. the class's defect, drawn as it looks: bridge (blobby local join of two adjacent lines), open (a cut
     in one line, rounded pull-back ends), short (a thin wire-like filament linking lines, often across
     several), crack (thin dark jagged branching fracture), scratch (long straight-ish CMP groove with a
     bright ridge, across many features), vias (missing / undersized / deformed / merged via), other
     (particle with shadow, particle cluster, residue stain, or local line wiggle);
  3. SEM formation: material/trench levels, bright edge rims (edge effect), surface texture, random
     orientation/tilt, charging ramps, beam blur, random brightness/contrast, Poisson shot noise,
     occasional scan-line noise.
Clean, cracks, scratches and other appear on both scene types, so the pattern alone does not give the
class away; the image mean is set at random per image, so brightness alone does not either.
Needs numpy and Pillow only.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CLASSES = ("clean", "bridges", "cracks", "opens", "shorts", "scratches", "vias", "other")
DEFAULT_SIZE = 128
DEFAULT_PER_CLASS = 60
MIN_SIZE = 32
SUPERSAMPLE = 4            # shapes are drawn at 4x and box-filtered down: anti-aliased edges
# Probability that a class is drawn on a via array (else a grating). Bridges/opens/shorts need lines;
# the vias class needs vias.
VIA_SCENE_PROB = {"clean": 0.45, "bridges": 0.0, "cracks": 0.45, "opens": 0.0, "shorts": 0.0,
                  "scratches": 0.45, "vias": 1.0, "other": 0.45}


# --------------------------------------------------------------------------------------------------
# Small numeric helpers


def _blur(a: np.ndarray, sigma: float, axes=(0, 1)) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (numpy only)."""
    if sigma <= 0.05:
        return a
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = a.astype(np.float32, copy=False)
    for axis in axes:
        n = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if n > radius else "edge")
        acc = np.zeros_like(out)
        for i, w in enumerate(kernel):
            acc += w * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def _smooth_noise_1d(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """Unit-variance 1-D noise with correlation length ~corr samples."""
    raw = rng.standard_normal(n + 8).astype(np.float32)
    sm = _blur(raw[None, :], corr, axes=(1,))[0, 4:4 + n]
    std = float(sm.std())
    return sm / std if std > 1e-6 else sm


def _smooth_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Unit-variance 2-D low-frequency noise."""
    field = _blur(rng.standard_normal(shape).astype(np.float32), sigma)
    std = float(field.std())
    return field / std if std > 1e-6 else field


def _blob_outline(rng, cx, cy, rx, ry, angle=0.0, roughness=0.1, points=28, neck=0.0):
    """An irregular closed outline around (cx, cy): ellipse + random low harmonics (+ optional waist)."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    r = np.ones(points)
    for h in (2, 3, 4):
        r += roughness / h * rng.normal() * np.cos(h * t + rng.uniform(0, 2 * np.pi))
    x = rx * r * np.cos(t)
    y = ry * r * np.sin(t) * (1.0 - neck * np.sin(t) ** 2)
    ca, sa = math.cos(angle), math.sin(angle)
    return list(zip(cx + ca * x - sa * y, cy + sa * x + ca * y))


class _Layer:
    """A coverage mask in [0, 1], drawn at SUPERSAMPLE x with PIL and box-filtered to the canvas."""

    def __init__(self, n: int, fill: float = 0.0):
        self.n = n
        self.img = Image.new("L", (n * SUPERSAMPLE, n * SUPERSAMPLE), int(round(fill * 255)))
        self.draw = ImageDraw.Draw(self.img)
        self.used = fill != 0.0

    @staticmethod
    def _v(value: float) -> int:
        return int(round(min(max(value, 0.0), 1.0) * 255))

    def polygon(self, pts, value: float = 1.0):
        self.draw.polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in pts], fill=self._v(value))
        self.used = True

    def ellipse(self, cx, cy, rx, ry, value: float = 1.0):
        s = SUPERSAMPLE
        self.draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=self._v(value))
        self.used = True

    def polyline(self, pts, widths, value: float = 1.0):
        """Segments with per-segment widths (len(widths) == len(pts) - 1), round joints."""
        s = SUPERSAMPLE
        v = self._v(value)
        for (x0, y0), (x1, y1), w in zip(pts[:-1], pts[1:], widths):
            width = max(1, int(round(w * s)))
            self.draw.line([(x0 * s, y0 * s), (x1 * s, y1 * s)], fill=v, width=width)
            r = width / 2.0
            self.draw.ellipse([x1 * s - r, y1 * s - r, x1 * s + r, y1 * s + r], fill=v)
        self.used = True

    def array(self) -> np.ndarray:
        small = self.img.resize((self.n, self.n), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------------------------
# Scenes (canvas coordinates: lines are vertical; the whole image is rotated/flipped at the end)


class _Scene:
    def __init__(self, rng, canvas: int, size: int):
        self.rng = rng
        self.n = canvas
        self.size = size
        self.s = size / 128.0
        self.material = None           # _Layer
        self.kind = ""
        self.pitch = 0.0
        self.lines: list[tuple[float, float]] = []       # (centre x, width) for gratings
        self.vias: list[dict] = []
        self.via_value = 0.0
        self.cracks = _Layer(canvas)
        self.scratch = _Layer(canvas)
        self.ridge = _Layer(canvas)
        self.glow = _Layer(canvas)
        self.particles: list[dict] = []
        self.stains: list[dict] = []
        self.crack_halo = 0.0
        self.tilt = 0.0

    def central_point(self, spread: float = 0.3):
        c = self.n / 2.0
        d = spread * self.size
        return c + self.rng.uniform(-d, d), c + self.rng.uniform(-d, d)


def _grating(scene: _Scene, wiggle: dict | None = None) -> None:
    rng, n, s = scene.rng, scene.n, scene.s
    pitch = rng.uniform(9.0, 26.0) * s
    duty = rng.uniform(0.32, 0.62)
    phase = rng.uniform(0, pitch)
    ler = rng.uniform(0.1, 0.55) * s * (1.7 if rng.random() < 0.1 else 1.0)
    corr = rng.uniform(1.5, 5.0)                           # in vertex steps (2 px at 128)
    step = 2.0 * s
    ys = np.arange(-2 * step, n + 2 * step, step)
    layer = _Layer(n)
    k = -1
    while True:
        cx = phase + k * pitch
        if cx - pitch > n:
            break
        width = duty * pitch * (1.0 + rng.normal(0, 0.03))
        left = cx - width / 2 + ler * _smooth_noise_1d(rng, len(ys), corr)
        right = cx + width / 2 + ler * _smooth_noise_1d(rng, len(ys), corr)
        if wiggle and abs(cx - wiggle["x"]) < wiggle["reach"] * pitch:
            bump = wiggle["amp"] * pitch * np.exp(-((ys - wiggle["y"]) / wiggle["extent"]) ** 2)
            shift = bump * np.sin(2 * np.pi * ys / wiggle["wavelength"] + wiggle["phase"])
            left, right = left + shift, right + shift
            right = np.maximum(right, left + 0.3 * width)
        layer.polygon(list(zip(left, ys)) + list(zip(right[::-1], ys[::-1])), 1.0)
        scene.lines.append((cx, width))
        k += 1
    scene.material, scene.kind, scene.pitch = layer, "grating", pitch


def _via_array(scene: _Scene) -> None:
    rng, n, s = scene.rng, scene.n, scene.s
    pitch = rng.uniform(13.0, 30.0) * s
    radius = rng.uniform(0.2, 0.34) * pitch
    pitch_y = pitch * rng.uniform(0.9, 1.15)
    stagger = rng.random() < 0.35
    holes = rng.random() < 0.7                       # dark contact holes in a film, else bright pillars
    ox, oy = rng.uniform(0, pitch), rng.uniform(0, pitch_y)
    vias = []
    for j in range(-1, int(n / pitch_y) + 2):
        shift = pitch / 2 if (stagger and j % 2) else 0.0
        for i in range(-1, int(n / pitch) + 2):
            r = radius * (1.0 + rng.normal(0, 0.035))
            vias.append({"x": ox + i * pitch + shift + rng.normal(0, 0.25 * s),
                         "y": oy + j * pitch_y + rng.normal(0, 0.25 * s),
                         "rx": r, "ry": r * (1.0 + rng.normal(0, 0.03)), "angle": rng.uniform(0, np.pi),
                         "rough": 0.05, "draw": True})
    scene.vias, scene.kind, scene.pitch = vias, "vias", pitch
    scene.via_value = 0.0 if holes else 1.0
    scene.material = _Layer(n, fill=1.0 if holes else 0.0)


def _draw_vias(scene: _Scene, rng: np.random.Generator) -> None:
    for v in scene.vias:
        # The outline is drawn from rng even for a missing via, so the other vias stay the same.
        outline = _blob_outline(rng, v["x"], v["y"], v["rx"], v["ry"], v["angle"], roughness=v["rough"],
                                points=24)
        if v["draw"]:
            scene.material.polygon(outline, scene.via_value)


# --------------------------------------------------------------------------------------------------
# Defects


def _nearest_line(scene: _Scene, x: float) -> int:
    centres = np.array([c for c, _ in scene.lines])
    k = int(np.argmin(np.abs(centres - x)))
    return min(max(k, 0), len(scene.lines) - 2)


def _bridge(scene: _Scene) -> None:
    rng, s = scene.rng, scene.s
    x, y0 = scene.central_point()
    k = _nearest_line(scene, x)
    (c0, w0), (c1, w1) = scene.lines[k], scene.lines[k + 1]
    x_left, x_right = c0 + w0 * rng.uniform(0.0, 0.4), c1 - w1 * rng.uniform(0.0, 0.4)
    rx = max((x_right - x_left) / 2, 1.5 * s)
    ry = max(rng.uniform(0.2, 0.6) * scene.pitch, 1.6 * s)
    value = 1.0 if rng.random() < 0.7 else rng.uniform(0.45, 0.8)      # sometimes a thin, faint join
    outline = _blob_outline(rng, (x_left + x_right) / 2, y0, rx, ry, rng.normal(0, 0.15),
                            roughness=0.25, neck=rng.uniform(0.0, 0.45))
    scene.material.polygon(outline, value)
    if rng.random() < 0.3:                                             # a satellite lump next to it
        scene.material.ellipse(x_left + rx * rng.uniform(0.4, 1.6), y0 + ry * rng.uniform(-1.2, 1.2),
                               rx * 0.5, ry * 0.5, value)


def _open(scene: _Scene) -> None:
    rng, s = scene.rng, scene.s
    x, y0 = scene.central_point()
    k = _nearest_line(scene, x)
    cx, w = scene.lines[k]
    gap = max(rng.uniform(0.15, 0.6) * scene.pitch, 1.8 * s)
    cap = w / 2 * rng.uniform(0.4, 1.0)
    residue = 0.0 if rng.random() < 0.75 else rng.uniform(0.15, 0.4)   # partly open: low contrast
    margin = 0.25 * (scene.pitch - w) + 0.5 * s
    top, bottom = y0 - gap / 2 - cap, y0 + gap / 2 + cap
    jag = lambda: rng.normal(0, 0.5 * s)                                # noqa: E731 - ragged cut edge
    scene.material.polygon([(cx - w / 2 - margin, top + jag()), (cx + w / 2 + margin, top + jag()),
                            (cx + w / 2 + margin, bottom + jag()), (cx - w / 2 - margin, bottom + jag())],
                           residue)
    # Rounded pull-back ends of the two line pieces.
    scene.material.ellipse(cx + rng.normal(0, 0.3 * s), top, w / 2 * 0.97, cap, 1.0)
    scene.material.ellipse(cx + rng.normal(0, 0.3 * s), bottom, w / 2 * 0.97, cap, 1.0)


def _short(scene: _Scene) -> None:
    rng, s = scene.rng, scene.s
    x, y0 = scene.central_point(0.2)
    span = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))
    k = _nearest_line(scene, x - span * scene.pitch / 2)
    k1 = min(k + span, len(scene.lines) - 1)
    x0, x1 = scene.lines[k][0], scene.lines[k1][0]
    dy = rng.uniform(0.4, 1.3) * max(x1 - x0, 1.5 * scene.pitch) * rng.choice([-1, 1])
    t = np.linspace(0, 1, 14)
    wave = rng.uniform(0.8, 2.5) * s * np.sin(np.pi * t * rng.uniform(1.5, 4) + rng.uniform(0, np.pi))
    sag = rng.normal(0, 2.0) * s * np.sin(np.pi * t)
    px = x0 + (x1 - x0) * t + (wave + sag) * 0.6
    py = y0 - dy / 2 + dy * t + (wave + sag) * 0.8
    width = rng.uniform(1.0, 2.0) * s
    pts = list(zip(px, py))
    scene.material.polyline(pts, [width] * (len(pts) - 1), 1.0)
    scene.glow.polyline(pts, [width * 1.6] * (len(pts) - 1), rng.uniform(0.4, 1.0))   # charged filament


def _random_walk(rng, x, y, angle, steps, step_len, jitter):
    pts, heading = [(x, y)], angle
    for _ in range(steps):
        heading += rng.normal(0, jitter) + 0.25 * (angle - heading)        # jagged, keeps a course
        x, y = x + step_len * math.cos(heading), y + step_len * math.sin(heading)
        pts.append((x, y))
    return pts


def _crack(scene: _Scene) -> None:
    rng, s = scene.rng, scene.s
    x, y = scene.central_point(0.22)
    angle = rng.uniform(0, 2 * np.pi)
    steps = int(rng.integers(14, 34))
    step_len = rng.uniform(1.2, 2.2) * s
    width0 = rng.uniform(1.1, 2.6) * s
    depth = rng.uniform(0.55, 0.95) if rng.random() < 0.8 else rng.uniform(0.3, 0.55)
    scene.crack_halo = rng.uniform(0.3, 0.9)             # bright broken edges beside the crack
    main = _random_walk(rng, x, y, angle, steps, step_len, 0.55)
    taper = np.minimum(1.0, np.minimum(np.arange(steps), steps - 1 - np.arange(steps)) / 4.0 + 0.35)
    scene.cracks.polyline(main, list(width0 * taper), depth)
    for i in range(2, steps - 2):                                          # branches
        if rng.random() < 0.09:
            sub_steps = int(rng.integers(4, max(5, steps // 2)))
            branch = _random_walk(rng, *main[i], angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.3),
                                  sub_steps, step_len * 0.9, 0.6)
            widths = width0 * 0.6 * np.linspace(1.0, 0.4, sub_steps)
            scene.cracks.polyline(branch, list(widths), depth * 0.9)


def _scratch(scene: _Scene) -> None:
    rng, s = scene.rng, scene.s
    x, y = scene.central_point(0.22)
    if scene.kind == "grating":          # across the lines, not along them
        angle = np.pi / 2 + rng.choice([-1, 1]) * rng.uniform(np.radians(15), np.radians(80))
    else:
        angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.75, 1.4) * scene.size
    width = rng.uniform(1.2, 2.8) * s
    depth = rng.uniform(0.4, 0.8) if rng.random() < 0.8 else rng.uniform(0.2, 0.4)
    count = 2 if rng.random() < 0.15 else 1
    for c in range(count):
        offset = c * rng.uniform(3, 7) * s
        ca, sa = math.cos(angle), math.sin(angle)
        t = np.linspace(-0.5, 0.5, 24)
        bend = rng.normal(0, 3.0) * s * (1 - (2 * t) ** 2)                    # gentle arc
        px = x + t * length * ca - (bend + offset) * sa
        py = y + t * length * sa + (bend + offset) * ca
        fade = np.clip(np.minimum(t + 0.5, 0.5 - t) * 8, 0.3, 1.0)           # thinner at the ends
        widths = list((width * fade)[:-1])
        pts = list(zip(px, py))
        scene.scratch.polyline(pts, widths, depth)
        # The groove's far wall catches the beam: a bright ridge just beside it.
        side = (width * 0.9) * np.array([-sa, ca])
        scene.ridge.polyline([(a + side[0], b + side[1]) for a, b in pts], [w * 0.7 for w in widths],
                             depth * rng.uniform(0.5, 1.0))


def _vias_defect(scene: _Scene) -> None:
    rng = scene.rng
    count = 1 if rng.random() < 0.8 else 2
    centre = np.array(scene.central_point(0.28))
    order = np.argsort([np.hypot(v["x"] - centre[0], v["y"] - centre[1]) for v in scene.vias])
    for idx in order[:count]:
        v = scene.vias[int(idx)]
        kind = rng.choice(["missing", "small", "deformed", "merged", "large"], p=[0.3, 0.2, 0.25, 0.15, 0.1])
        if kind == "missing":
            v["draw"] = False
        elif kind == "small":
            f = rng.uniform(0.3, 0.6)
            v["rx"] *= f
            v["ry"] *= f
        elif kind == "large":
            f = rng.uniform(1.35, 1.6)
            v["rx"] *= f
            v["ry"] *= f
        elif kind == "deformed":
            v["rx"] *= rng.uniform(1.3, 1.8)
            v["ry"] *= rng.uniform(0.55, 0.85)
            v["rough"] = rng.uniform(0.15, 0.4)
        else:   # merged with its nearest neighbour: a capsule between the two
            others = [w for w in scene.vias if w is not v]
            w = min(others, key=lambda o: np.hypot(o["x"] - v["x"], o["y"] - v["y"]))
            half = min(v["rx"], w["rx"]) * rng.uniform(0.6, 0.95)
            dx, dy = w["x"] - v["x"], w["y"] - v["y"]
            norm = math.hypot(dx, dy) or 1.0
            scene.vias.append({"x": (v["x"] + w["x"]) / 2, "y": (v["y"] + w["y"]) / 2,
                               "rx": norm / 2, "ry": half, "angle": math.atan2(dy, dx), "rough": 0.1,
                               "draw": True})


def _other(scene: _Scene) -> None:
    rng, s = scene.rng, scene.s
    kind = rng.choice(["particle", "cluster", "stain"], p=[0.55, 0.2, 0.25])     # (wiggle: see _render)
    x, y = scene.central_point()
    if kind == "particle":
        scene.particles.append(_particle_spec(rng, x, y, rng.uniform(3.0, 8.0) * s))
    elif kind == "cluster":
        for _ in range(int(rng.integers(2, 5))):
            scene.particles.append(_particle_spec(rng, x + rng.normal(0, 4 * s), y + rng.normal(0, 4 * s),
                                                  rng.uniform(2.0, 4.0) * s))
    elif kind == "stain":
        scene.stains.append({"x": x, "y": y, "r": rng.uniform(6, 13) * s,
                             "seed": int(rng.integers(2 ** 31)),
                             "delta": rng.choice([-1, 1]) * rng.uniform(0.15, 0.35)})


def _particle_spec(rng, x, y, r):
    return {"x": x, "y": y, "r": r, "bright": rng.uniform(0.85, 1.25), "rough": rng.uniform(0.05, 0.3),
            "harm": [(rng.normal(), rng.uniform(0, 2 * np.pi)) for _ in range(3)],
            "shadow": rng.uniform(0.35, 0.7), "shadow_dir": rng.uniform(0, 2 * np.pi)}


# --------------------------------------------------------------------------------------------------
# SEM image formation


def _add_particles(img: np.ndarray, scene: _Scene, yy, xx) -> np.ndarray:
    for p in scene.particles:
        r = p["r"]
        reach = int(math.ceil(2.5 * r)) + 2
        y0, y1 = max(0, int(p["y"]) - reach), min(scene.n, int(p["y"]) + reach)
        x0, x1 = max(0, int(p["x"]) - reach), min(scene.n, int(p["x"]) + reach)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - p["y"], xx[y0:y1, x0:x1] - p["x"]
        theta = np.arctan2(dy, dx)
        rad = r * (1 + sum(p["rough"] / (h + 2) * a * np.cos((h + 2) * theta + ph)
                           for h, (a, ph) in enumerate(p["harm"])))
        rho = np.hypot(dx, dy) / rad
        alpha = np.clip((1.0 - rho) * r / 0.8 + 0.5, 0, 1)                    # ~0.8 px soft edge
        height = np.sqrt(np.clip(1 - rho ** 2, 0, 1))
        # Detector shadow: a dark crescent on one side, outside the particle.
        sx, sy = math.cos(p["shadow_dir"]) * 0.7 * r, math.sin(p["shadow_dir"]) * 0.7 * r
        srho = np.hypot(dx - sx, dy - sy) / (rad * 1.15)
        shadow = np.clip((1.0 - srho) * 3, 0, 1) * (1 - alpha)
        region = img[y0:y1, x0:x1]
        region *= 1 - p["shadow"] * shadow
        # Bright body with a brighter rim (edge effect) and a slightly lit top.
        lit = 0.15 * (dx * math.cos(p["shadow_dir"] + np.pi) + dy * math.sin(p["shadow_dir"] + np.pi)) / r
        body = p["bright"] * (0.75 + 0.25 * height) + 0.35 * (1 - height) ** 2 + lit * height
        img[y0:y1, x0:x1] = region * (1 - alpha) + body * alpha
    return img


def _add_stains(img: np.ndarray, scene: _Scene, yy, xx) -> np.ndarray:
    for st in scene.stains:
        dist = np.hypot(yy - st["y"], xx - st["x"]) / st["r"]
        texture = _smooth_field(np.random.default_rng(st["seed"]), img.shape, 2.5 * scene.s)
        shape = 1.0 - dist + 0.35 * texture
        mask = np.clip(shape * 3.0, 0, 1)
        mask = _blur(mask, 0.8 * scene.s)
        img = img + st["delta"] * mask
    return img


def _form_image(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Layers (canvas) -> noisy SEM frame (float, size x size, roughly 0..1)."""
    n, s, size = scene.n, scene.s, scene.size
    material = scene.material.array()
    edge_sigma = rng.uniform(0.5, 1.1) * s
    mb = _blur(material, edge_sigma)
    gy, gx = np.gradient(mb)
    rim = np.clip(np.hypot(gx, gy) * edge_sigma * 2.5, 0, 1)

    top, bottom = rng.uniform(0.45, 0.75), rng.uniform(0.12, 0.4)
    if rng.random() < 0.15:                       # material darker than the trench/film
        top, bottom = bottom + 0.1, top
    img = bottom + (top - bottom) * mb + rng.uniform(0.25, 0.7) * rim
    grain = _smooth_field(rng, (n, n), rng.uniform(0.6, 1.5) * s)
    img += rng.uniform(0.0, 0.035) * grain * (0.4 + mb)

    if scene.glow.used:
        img += 0.25 * _blur(scene.glow.array(), 0.7 * s)
    if scene.cracks.used:
        dark = _blur(scene.cracks.array(), 0.35 * s)
        halo = np.clip(_blur(dark, 1.4 * s) - dark, 0, None)
        img = img * (1 - dark) + scene.crack_halo * halo
    if scene.scratch.used:
        groove = _blur(scene.scratch.array(), 0.5 * s)
        img = img * (1 - groove) + 0.7 * _blur(scene.ridge.array(), 0.6 * s)
    if scene.particles or scene.stains:
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
        img = _add_stains(img, scene, yy, xx)
        img = _add_particles(img, scene, yy, xx)

    # Orientation: tilt (on the oversized canvas), then crop, flip and transpose.
    angle = scene.tilt
    if angle:
        img = np.asarray(Image.fromarray(img.astype(np.float32))
                         .rotate(angle, resample=Image.Resampling.BICUBIC), dtype=np.float32)
    off = (n - size) // 2
    img = img[off:off + size, off:off + size]
    if rng.random() < 0.5:
        img = img.T
    if rng.random() < 0.5:
        img = img[::-1]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = np.ascontiguousarray(img)

    # Charging: a smooth ramp plus a broad bright/dark patch.
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    phi = rng.uniform(0, 2 * np.pi)
    img += rng.uniform(0.0, 0.3) * (xx * math.cos(phi) + yy * math.sin(phi))
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    patch_width = rng.uniform(0.2, 0.5)
    img += rng.uniform(-0.12, 0.12) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * patch_width ** 2))

    img = _blur(img, rng.uniform(0.35, 1.0) * s)                                 # beam spot
    # Random brightness/contrast: the mean is drawn per image, so it carries no class information.
    img = (img - img.mean()) * rng.uniform(0.6, 1.3) + rng.uniform(0.3, 0.6)

    dose = rng.uniform(60, 400)                                                  # electrons / pixel
    # Shot noise: Poisson counts, variance = mean, in the normal approximation (close at >= 20
    # electrons) so the noise field is the same random draw whatever the scene holds.
    noisy = np.sqrt(np.clip(img, 0.0, 1.5) / dose) * rng.standard_normal(img.shape).astype(np.float32)
    if rng.random() < 0.4:                                  # slow detector: noise smeared along the scan
        noisy = _blur(noisy, rng.uniform(0.5, 1.0), axes=(1,)) * 1.4
    img = img + noisy + rng.normal(0, rng.uniform(0.003, 0.015), img.shape)
    if rng.random() < 0.25:                                                       # scan-line noise
        img += rng.normal(0, rng.uniform(0.01, 0.035), (size, 1))
        for _ in range(int(rng.integers(1, 4))):
            row = int(rng.integers(0, size))
            start = int(rng.integers(0, size // 2))
            img[row, start:] += rng.choice([-1, 1]) * rng.uniform(0.05, 0.15)
    return img


def _check(class_name: str, size: int) -> None:
    if class_name not in CLASSES:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASSES)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")


def _render(class_name: str, size: int, seeds, with_defect: bool = True) -> np.ndarray:
    """Independent random streams for layout, pattern, defect and imaging, so the same seeds with
    and without the defect give the same scene and the same noise (see _render_pair)."""
    layout, pattern, defect, imaging = (np.random.default_rng(int(x)) for x in seeds)
    tilt_roll = layout.random()
    tilt = 0.0
    if tilt_roll < 0.2:
        tilt = layout.choice([-1, 1]) * layout.uniform(2, 10)
    elif tilt_roll < 0.3:
        tilt = layout.choice([-1, 1]) * layout.uniform(30, 50)
    canvas = int(math.ceil(size * 1.45)) if tilt else size
    canvas += (canvas - size) % 2
    scene = _Scene(pattern, canvas, size)
    scene.tilt = float(tilt)
    on_vias = layout.random() < VIA_SCENE_PROB[class_name]
    wiggle_roll = layout.random()
    if not with_defect:
        class_name = "clean"

    if on_vias:
        _via_array(scene)
        scene.rng = defect
        if class_name == "vias":
            _vias_defect(scene)
        _draw_vias(scene, pattern)
    else:
        wiggle = None
        if class_name == "other" and wiggle_roll < 0.15:        # "other" as a local line wiggle
            scene.rng = defect
            x, y = scene.central_point()
            wiggle = {"x": x, "y": y, "reach": defect.uniform(0.8, 2.2), "amp": defect.uniform(0.2, 0.4),
                      "extent": defect.uniform(4, 10) * scene.s,
                      "wavelength": defect.uniform(6, 14) * scene.s, "phase": defect.uniform(0, 2 * np.pi)}
            scene.rng = pattern
            class_name = "clean"          # the wiggle is the defect; nothing else to add
        _grating(scene, wiggle)
        scene.rng = defect
    {"bridges": _bridge, "opens": _open, "shorts": _short, "cracks": _crack, "scratches": _scratch,
     "other": _other}.get(class_name, lambda _scene: None)(scene)

    img = _form_image(scene, imaging)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def render(class_name: str, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One synthetic SEM image of `class_name` -> 2-D uint8 array (size x size)."""
    _check(class_name, size)
    return _render(class_name, size, rng.integers(0, 2 ** 63, size=4))


def _render_pair(class_name: str, rng: np.random.Generator, size: int = DEFAULT_SIZE):
    """(without defect, with defect): the same scene and noise; for tests of what a defect changes."""
    _check(class_name, size)
    seeds = rng.integers(0, 2 ** 63, size=4)
    return _render(class_name, size, seeds, with_defect=False), _render(class_name, size, seeds)


# --------------------------------------------------------------------------------------------------
# Dataset and contact sheet


def image_rng(seed: int, class_index: int, index: int) -> np.random.Generator:
    """The generator for one image: independent of how many images are made."""
    return np.random.default_rng([int(seed), int(class_index), int(index)])


def _write_png(array: np.ndarray, path: Path) -> None:
    """Complete files only: write beside, then rename over."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def generate_dataset(out_dir: str | os.PathLike, per_class: int = DEFAULT_PER_CLASS, seed: int = 0,
                     size: int = DEFAULT_SIZE, classes=CLASSES, keep: dict | None = None) -> dict[str, int]:
    """Write out_dir/<class>/<class>_NNNN.png for every class; return {class: count}.

    Files from an earlier, larger run with the same naming are removed so each folder holds exactly
    `per_class` images; other files in out_dir are left alone. `keep`, if given, collects the first
    few arrays per class ({class: [arrays]}, filled up to its 'limit' key) for a contact sheet.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    limit = int(keep.pop("limit", 0)) if keep is not None else 0
    counts = {}
    for class_index, name in enumerate(CLASSES):
        if name not in classes:
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = render(name, image_rng(seed, class_index, i), size)
            _write_png(array, folder / f"{name}_{i:04d}.png")
            if keep is not None and i < limit:
                keep.setdefault(name, []).append(array)
        pattern = re.compile(rf"{re.escape(name)}_(\d{{4,}})\.png")
        for stale in folder.iterdir():
            m = pattern.fullmatch(stale.name)
            if m and int(m.group(1)) >= per_class:
                stale.unlink()
        counts[name] = per_class
    return counts


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:          # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def contact_sheet(images: dict[str, list[np.ndarray]], path: str | os.PathLike,
                  label_width: int = 110) -> Path:
    """A labelled grid: one row per class (name on the left), its images to the right."""
    rows = [(name, imgs) for name, imgs in images.items() if imgs]
    if not rows:
        raise ValueError("no images for the contact sheet")
    tile = max(a.shape[0] for _, imgs in rows for a in imgs)
    cols = max(len(imgs) for _, imgs in rows)
    gap = 4
    width = label_width + cols * (tile + gap)
    height = len(rows) * (tile + gap) + gap
    sheet = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(sheet)
    font = _font(max(12, tile // 8))
    for r, (name, imgs) in enumerate(rows):
        y = gap + r * (tile + gap)
        draw.text((8, y + tile // 2), name, fill=0, font=font, anchor="lm")
        for c, arr in enumerate(imgs):
            sheet.paste(Image.fromarray(arr), (label_width + c * (tile + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png(np.asarray(sheet), path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train synth",
                                     description="Write a deterministic synthetic SEM dataset (8 classes).")
    parser.add_argument("--out", required=True, help="output folder; gets one sub-folder per class")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                        help="images per class (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in pixels (default 128)")
    parser.add_argument("--contact-sheet", metavar="PNG", help="also write a labelled grid of examples here")
    parser.add_argument("--sheet-columns", type=int, default=6,
                        help="images per class on the sheet (default 6)")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be >= 1")
    if args.size < MIN_SIZE:
        parser.error(f"--size must be >= {MIN_SIZE}")
    if args.sheet_columns < 1:
        parser.error("--sheet-columns must be >= 1")

    start = time.perf_counter()
    keep = {"limit": args.sheet_columns} if args.contact_sheet else None
    try:
        counts = generate_dataset(args.out, args.per_class, args.seed, args.size, keep=keep)
    except (OSError, ValueError) as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print(f"synthetic SEM data in {Path(args.out).resolve()} (seed {args.seed}, {args.size}x{args.size})")
    print(f"{'class':<10} {'images':>6}")
    for name, count in counts.items():
        print(f"{name:<10} {count:>6}")
    print(f"{'total':<10} {sum(counts.values()):>6}   ({elapsed:.1f} s)")
    if args.contact_sheet:
        try:
            sheet = contact_sheet(keep, args.contact_sheet)
        except OSError as exc:
            print(f"synth: error: cannot write contact sheet: {exc}", file=sys.stderr)
            return 1
        print(f"contact sheet: {sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
