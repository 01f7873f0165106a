"""Rendering of task images with PIL: graphs (coloured dots joined by black lines) and sudoku grids.

Everything is drawn from explicit positions and a caller-supplied ``numpy`` generator, so an
image is a pure function of its instance and its seed. Digits use a built-in 3x5 bitmap font
scaled by whole pixels: no system font is involved, so images are identical across machines
and stay crisp at 64 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

#: One colour per node id. Ten mutually distinct hues from Trubetskoy's "20 distinct colours"
#: list, leaving out the light ones (yellow, lavender, beige, mint) that fade into a white background
#: and the dark ones (navy, maroon) that read as black edges at 64 px.
NODE_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (67, 99, 216),  # blue
    (245, 130, 49),  # orange
    (145, 30, 180),  # purple
    (66, 212, 244),  # cyan
    (240, 50, 230),  # magenta
    (154, 99, 36),  # brown
    (70, 153, 144),  # teal
    (169, 169, 169),  # grey
)

#: 3x5 bitmap glyphs for the digits 1-9 ('#' = ink).
_GLYPHS: dict[int, tuple[str, ...]] = {
    1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", ".##", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"),
    7: ("###", "..#", ".#.", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "###"),
}
_GLYPH_MASKS = {d: np.array([[c == "#" for c in row] for row in rows]) for d, rows in _GLYPHS.items()}


def background(size: int, noise: float, rng: np.random.Generator) -> Image.Image:
    """A white RGB canvas; with ``noise`` > 0, grey speckle of standard deviation ``noise`` x 64 levels.

    64 grey levels at noise 1 is strong clutter that still leaves black strokes and saturated
    dots clearly above it. The speckle only darkens (|N(0, s)|), so white stays the mode.
    """
    if noise <= 0:
        return Image.new("RGB", (size, size), "white")
    grey = 255.0 - np.abs(rng.normal(0.0, noise * 64.0, size=(size, size)))
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")


def jitter_color(color: Sequence[int], amount: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """``color`` with each channel moved by up to ``amount`` x 40 levels (hues stay distinct)."""
    shifted = np.asarray(color, dtype=float) + rng.uniform(-40.0, 40.0, size=3) * amount
    r, g, b = np.clip(np.round(shifted), 0, 255).astype(int)
    return int(r), int(g), int(b)


def circle_positions(n: int, size: int, margin: float) -> np.ndarray:
    """``n`` points evenly on a circle inscribed in the canvas, node 0 at the top, clockwise."""
    radius = size / 2 - margin
    angles = -math.pi / 2 + 2 * math.pi * np.arange(n) / n
    centre = (size - 1) / 2
    return np.stack([centre + radius * np.cos(angles), centre + radius * np.sin(angles)], axis=1)


def _touching(pos: np.ndarray, edges: Sequence[tuple[int, int]], clearance: float) -> int:
    """How many (edge, dot) pairs have the edge within ``clearance`` of a dot it does not join."""
    if not edges:
        return 0
    e = np.asarray(edges)
    a, b = pos[e[:, 0]][:, None, :], pos[e[:, 1]][:, None, :]  # (m, 1, 2)
    ab = b - a
    t = np.clip(((pos[None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0.0, 1.0)  # (m, n)
    dist = np.linalg.norm(pos[None] - (a + t[..., None] * ab), axis=-1)
    dist[np.arange(len(e)), e[:, 0]] = np.inf
    dist[np.arange(len(e)), e[:, 1]] = np.inf
    return int((dist < clearance).sum())


def random_positions(
    n: int, edges: Sequence[tuple[int, int]], size: int, node_radius: int, line_width: int, rng: np.random.Generator
) -> np.ndarray:
    """Random dot positions: dots never overlap, and edges avoid dots they do not join where possible.

    Dots are placed one at a time at the first of 100 random spots 2.5 radii from every placed dot
    (centres; half a radius of background between dots). Of up to 20 such layouts the first with
    no edge touching a foreign dot is taken, else the one with fewest such contacts: on a 64 px
    canvas clean layouts exist for sparse graphs but not for 10 dense nodes. If no layout fits
    (tiny canvas, large dots) the circle layout is used.
    """
    margin = node_radius + 2
    clearance = node_radius + line_width / 2 + 1  # closer than this a line reads as touching the dot
    best, best_contacts = None, None
    for _ in range(20):
        pos = np.empty((n, 2))
        for k in range(n):
            spots = rng.uniform(margin, size - 1 - margin, size=(100, 2))
            if k:
                gaps = np.linalg.norm(spots[:, None, :] - pos[None, :k, :], axis=2).min(axis=1)
                spots = spots[gaps >= 2.5 * node_radius]
            if not len(spots):
                break
            pos[k] = spots[0]
        else:
            contacts = _touching(pos, edges, clearance)
            if best_contacts is None or contacts < best_contacts:
                best, best_contacts = pos, contacts
            if contacts == 0:
                break
    return best if best is not None else circle_positions(n, size, margin)


def draw_graph(
    num_nodes: int,
    edges: Sequence[tuple[int, int]],
    *,
    size: int,
    layout: str,
    line_width: int,
    node_radius: int,
    jitter: float,
    noise: float,
    distractors: int,
    rng: np.random.Generator,
) -> Image.Image:
    """Render a graph: node ``i`` is a dot of colour ``NODE_COLORS[i]``, edges are black lines.

    ``jitter`` in [0, 1] scales per-image style variation: node positions move by up to one
    radius, colours by up to 40 levels per channel, edge grey by up to 80 levels, line width
    and radius by up to +-25%. Distractors are small squares in node colours, drawn under the
    edges so they never hide one.
    """
    img = background(size, noise, rng)
    draw = ImageDraw.Draw(img)
    radius = max(1, round(node_radius * (1 + jitter * rng.uniform(-0.25, 0.25))))
    width = max(1, round(line_width * (1 + jitter * rng.uniform(-0.25, 0.25))))
    margin = radius + 2
    if layout == "circle":
        pos = circle_positions(num_nodes, size, margin)
    else:
        pos = random_positions(num_nodes, edges, size, radius, width, rng)
    pos = np.clip(pos + rng.uniform(-1, 1, size=pos.shape) * jitter * radius, margin, size - 1 - margin)

    for _ in range(distractors):
        # Up to 50 tries for a spot 2.5 radii from every dot centre; a crowded canvas gets fewer marks.
        for _ in range(50):
            xy = rng.uniform(margin, size - 1 - margin, size=2)
            if np.linalg.norm(pos - xy, axis=1).min() >= 2.5 * radius:
                half = 0.6 * radius
                color = jitter_color(NODE_COLORS[int(rng.integers(len(NODE_COLORS)))], jitter, rng)
                draw.rectangle([xy[0] - half, xy[1] - half, xy[0] + half, xy[1] + half], fill=color)
                break

    grey = int(round(jitter * rng.uniform(0, 80)))
    for i, j in edges:
        draw.line([tuple(pos[i]), tuple(pos[j])], fill=(grey, grey, grey), width=width)
    for i in range(num_nodes):
        x, y = pos[i]
        color = jitter_color(NODE_COLORS[i], jitter, rng)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    return img


def draw_sudoku(puzzle: Sequence[Sequence[int]], *, size: int, jitter: float, noise: float, rng: np.random.Generator) -> Image.Image:
    """Render a sudoku grid with its givens (0 = blank) on a ``size`` px canvas.

    Each cell is ``size // n`` px square (at 64 px a 4x4 cell is exactly one 16 px patch).
    Cell borders are 1 px grey, box borders 1 px black (2 px when cells are >= 12 px).
    Digits are 3x5 glyphs scaled by ``max(1, (cell - 4) // 5)`` (2x at 16 px cells: 6x10 px),
    centred; ``jitter`` moves each digit by up to a quarter of the free margin and tints it.
    """
    n = len(puzzle)
    box = math.isqrt(n)
    cell = size // n
    img = background(size, noise, rng)
    draw = ImageDraw.Draw(img)
    box_width = 2 if cell >= 12 else 1
    for k in range(n + 1):
        at = min(k * cell, size - 1)
        if k % box:
            draw.line([(at, 0), (at, n * cell)], fill=(160, 160, 160))
            draw.line([(0, at), (n * cell, at)], fill=(160, 160, 160))
    for k in range(0, n + 1, box):
        at = min(k * cell, size - 1)
        lo = max(0, at - box_width // 2)
        draw.rectangle([lo, 0, lo + box_width - 1, min(n * cell, size - 1)], fill="black")
        draw.rectangle([0, lo, min(n * cell, size - 1), lo + box_width - 1], fill="black")

    scale = max(1, (cell - 4) // 5)
    gw, gh = 3 * scale, 5 * scale
    pixels = np.array(img)
    for r in range(n):
        for c in range(n):
            digit = puzzle[r][c]
            if not digit:
                continue
            slack_x, slack_y = (cell - gw) / 2, (cell - gh) / 2
            x0 = c * cell + int(round(slack_x + jitter * rng.uniform(-0.25, 0.25) * slack_x))
            y0 = r * cell + int(round(slack_y + jitter * rng.uniform(-0.25, 0.25) * slack_y))
            ink = jitter_color((0, 0, 0), jitter, rng)
            glyph = np.kron(_GLYPH_MASKS[digit], np.ones((scale, scale), dtype=bool))
            pixels[y0 : y0 + gh, x0 : x0 + gw][glyph] = ink
    return Image.fromarray(pixels, "RGB")
