"""Synthetic scenes: sampling, rendering, and the captions and questions they imply.

A scene is a light background with one to three coloured shapes, each in its own cell
of a 3x3 grid, and (about half the time) a small black digit in an empty cell. Every
piece of text (captions, reference captions, question/answer pairs) is derived from
the scene description, so image and text always agree and answers can be checked.

Notable choices:

- The vocabulary is tiny (colours, shapes, positions, digits, a few function words),
  so a small model learns the language in minutes and the remaining difficulty is
  visual grounding.
- The digit is drawn with PIL's built-in *bitmap* font (not a TrueType one, which may
  be missing) scaled to a fixed fraction of a grid cell: about 12 px tall at 96 px,
  readable; about 4 px at 32 px, a blob. Image resolution therefore matters for
  the digit questions, which is what a resolution ablation needs to detect.
- Everything is a pure function of a ``random.Random`` passed in, so the corpus
  generator controls determinism by seeding one rng per sample.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (225, 190, 0),
    "purple": (135, 45, 175),
    "orange": (245, 125, 15),
}
SIZES = ("small", "large")
# Cells in reading order; the index is row * 3 + col.
CELLS = ("top left", "top", "top right", "left", "center", "right",
         "bottom left", "bottom", "bottom right")
# How a cell is said inside a sentence ("a red circle at the top left").
CELL_PHRASE = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QTYPES = ("color", "shape", "count", "position", "digit", "relation")


@dataclass
class SceneObject:
    shape: str
    """One of SHAPES."""
    color: str
    """A key of COLORS."""
    size: str
    """One of SIZES."""
    cell: int
    """Grid cell index 0..8 (row * 3 + col)."""
    dx: float = 0.0
    """Horizontal jitter inside the cell, as a fraction of the cell width."""
    dy: float = 0.0
    """Vertical jitter inside the cell, as a fraction of the cell height."""

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def name(self) -> str:
        """Unambiguous within a scene: no scene repeats a (color, shape) pair."""
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    background: tuple[int, int, int]
    """Light RGB background colour."""
    objects: list[SceneObject] = field(default_factory=list)
    """One to three shapes, in distinct cells, sorted in reading order."""
    digit: int | None = None
    """The digit written in the scene, if any."""
    digit_cell: int | None = None
    """Cell holding the digit (never one holding a shape)."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["background"] = list(self.background)
        # Human-readable positions, so a reader of the shards need not know the indexing.
        for o, od in zip(self.objects, d["objects"]):
            od["position"] = CELLS[o.cell]
        d["digit_position"] = None if self.digit_cell is None else CELLS[self.digit_cell]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Scene":
        objs = [SceneObject(**{k: v for k, v in o.items() if k != "position"}) for o in d["objects"]]
        return cls(tuple(d["background"]), objs, d.get("digit"), d.get("digit_cell"))

    def signature(self) -> tuple:
        """Content ignoring jitter and background: two scenes with the same signature
        get the same captions and answers."""
        objs = tuple((o.shape, o.color, o.size, o.cell) for o in self.objects)
        return objs, self.digit, self.digit_cell


def sample_scene(rng: random.Random) -> Scene:
    """Draw a scene. Two or three objects are more likely than one, which keeps
    relation questions frequent and the space of scenes large."""
    background = tuple(rng.randint(225, 252) for _ in range(3))
    n = rng.choices((1, 2, 3), weights=(0.2, 0.4, 0.4))[0]
    cells = sorted(rng.sample(range(9), n))
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
    objects = [
        SceneObject(shape=s, color=c, size=rng.choice(SIZES), cell=cell,
                    dx=round(rng.uniform(-0.12, 0.12), 3), dy=round(rng.uniform(-0.12, 0.12), 3))
        for (s, c), cell in zip(pairs, cells)
    ]
    digit = digit_cell = None
    if rng.random() < 0.5:
        digit = rng.randrange(10)
        digit_cell = rng.choice([c for c in range(9) if c not in cells])
    return Scene(background, objects, digit, digit_cell)


_FONT = None


def _digit_mask(digit: int, height: int) -> Image.Image:
    """The digit as an 'L' mask of the given height, from the built-in bitmap font."""
    global _FONT
    if _FONT is None:
        # load_default_imagefont is the bitmap font; load_default may pick a TrueType one.
        loader = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
        _FONT = loader()
    text = str(digit)
    left, top, right, bottom = _FONT.getbbox(text)
    glyph = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(glyph).text((-left, -top), text, fill=255, font=_FONT)
    width = max(1, round(glyph.width * height / glyph.height))
    # BOX averages when shrinking (small renders blur the digit), NEAREST keeps strokes crisp
    # when enlarging.
    resample = Image.Resampling.NEAREST if height >= glyph.height else Image.Resampling.BOX
    return glyph.resize((width, max(1, height)), resample)


def render(scene: Scene, size: int) -> Image.Image:
    """Draw the scene as a ``size`` x ``size`` RGB image."""
    img = Image.new("RGB", (size, size), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene.objects:
        cx = (o.col + 0.5 + o.dx) * cell
        cy = (o.row + 0.5 + o.dy) * cell
        r = cell * (0.22 if o.size == "small" else 0.38)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.88  # same visual weight as the circle
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    if scene.digit is not None:
        mask = _digit_mask(scene.digit, round(cell * 0.38))
        cx = (scene.digit_cell % 3 + 0.5) * cell
        cy = (scene.digit_cell // 3 + 0.5) * cell
        img.paste((0, 0, 0), (round(cx - mask.width / 2), round(cy - mask.height / 2)), mask)
    return img


# ---------------------------------------------------------------- text from a scene

def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _phrase(o: SceneObject, with_size: bool, with_place: bool = True) -> str:
    words = ([o.size] if with_size else []) + [o.color, o.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words) + (" " + CELL_PHRASE[CELLS[o.cell]] if with_place else "")


def _digit_sentence(scene: Scene, variant: int) -> str:
    if scene.digit is None:
        return ""
    where = CELLS[scene.digit_cell]
    return (f" the number {scene.digit} is written {CELL_PHRASE[where]}.",
            f" there is a {scene.digit} {CELL_PHRASE[where]}.",
            f" the digit {scene.digit} is {CELL_PHRASE[where]}.")[variant % 3]


def _templates(scene: Scene, with_size: bool) -> list[str]:
    """Every caption form for a scene; captions and references are drawn from these."""
    objs = _join([_phrase(o, with_size) for o in scene.objects])
    n = len(scene.objects)
    count = f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}"
    return [
        f"{objs}.",
        f"{count}: {objs}.",
        f"there is {objs}.",
        f"a picture of {objs}.",
        f"an image with {count}: {objs}.",
    ]


def caption(scene: Scene, rng: random.Random, after_verb: bool = False) -> str:
    """One caption in a randomly chosen template, mentioning the digit if there is one.
    ``after_verb`` keeps to the forms that read well after "picture 2 shows"."""
    forms = _templates(scene, with_size=rng.random() < 0.5)
    form = rng.choice(forms[:2] if after_verb else forms)
    return form + _digit_sentence(scene, rng.randrange(3))


def reference_captions(scene: Scene) -> list[str]:
    """Four distinct paraphrases (two with sizes, two without) for CIDEr-style scoring."""
    with_size, without = _templates(scene, True), _templates(scene, False)
    picks = [with_size[0], without[1], with_size[2], without[3]]
    return [p + _digit_sentence(scene, i) for i, p in enumerate(picks)]


def _unique(values: list[str], v: str) -> bool:
    return values.count(v) == 1


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """One (question, answer, qtype) per question type the scene supports, in QTYPES
    order. Questions are only asked when their referent is unambiguous."""
    objs = scene.objects
    out: list[tuple[str, str, str]] = []
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]

    by_shape = [o for o in objs if _unique(shapes, o.shape)]
    if by_shape:
        o = rng.choice(by_shape)
        out.append((f"what color is the {o.shape}?", o.color, "color"))
    by_color = [o for o in objs if _unique(colors, o.color)]
    if by_color:
        o = rng.choice(by_color)
        out.append((f"what shape is the {o.color} object?", o.shape, "shape"))

    if rng.random() < 0.5:
        out.append(("how many shapes are there?", str(len(objs)), "count"))
    else:
        s = rng.choice(SHAPES)
        out.append((f"how many {s}s are there?", str(shapes.count(s)), "count"))

    o = rng.choice(objs)
    out.append((f"where is the {o.name}?", CELLS[o.cell], "position"))

    if scene.digit is not None:
        out.append(("what number is written?", str(scene.digit), "digit"))

    if len(objs) >= 2:
        # Choose the answer first so "yes" and "no" are equally likely; picking a relation
        # at random would make "no" the answer about two times in three.
        cases = {"yes": [], "no": []}
        for a in objs:
            for b in objs:
                if a is b:
                    continue
                for rel, holds in (("left of", a.col < b.col), ("right of", a.col > b.col),
                                   ("above", a.row < b.row), ("below", a.row > b.row)):
                    cases["yes" if holds else "no"].append((a, rel, b))
        answer = rng.choice([k for k in ("yes", "no") if cases[k]])
        a, rel, b = rng.choice(cases[answer])
        out.append((f"is the {a.name} {rel} the {b.name}?", answer, "relation"))
    return out


def supported_qtypes(scene: Scene) -> list[str]:
    """The question types ``questions`` can ask about this scene (which types are
    possible depends only on the scene, not on the rng)."""
    return [t for *_, t in questions(scene, random.Random(0))]
