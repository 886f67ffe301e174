"""A synthetic visual task for the vision demo: the colour of a shape drawn with Pillow.

Each row is in TRL's vision format: a user turn with an image part and a question, the colour as the
reply, the image as PNG bytes in `images`, and `answer` for checking. Four colours (chance is 25 %),
three kinds of shape at random places and sizes on a light background with a little noise, so no
single pixel gives the answer away. Seeded: the same rows every time; the held-out split uses another
seed, so its images are new.
"""

from __future__ import annotations

import io
import random

COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (225, 200, 40)}
QUESTION = "What colour is the shape? Answer with one word."


def _image(rng: random.Random, colour: tuple[int, int, int], size: int = 64) -> bytes:
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(200, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    side = rng.randint(size // 4, size // 2)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    kind = rng.choice(["square", "circle", "triangle"])
    if kind == "square":
        draw.rectangle((x, y, x + side, y + side), fill=jitter)
    elif kind == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=jitter)
    else:
        draw.polygon([(x, y + side), (x + side, y + side), (x + side // 2, y)], fill=jitter)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def shape_colours(n: int = 256, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        rows.append({
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": name}],
            "images": [_image(rng, COLOURS[name])],
            "answer": name,
        })
    rng.shuffle(rows)
    return rows


def shape_colours_eval(n: int = 64) -> list[dict]:
    return shape_colours(n, seed=1_000_003)
