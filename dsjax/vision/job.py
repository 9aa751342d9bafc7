"""A small vision-language job: visual questions about synthetic shapes, learned from scratch on a CPU.

Each scene is a 32 x 32 picture of one to three shapes (circle, square, triangle; each kind and each colour at
most once) in different quadrants, coloured red, green, blue or yellow. Questions, one per example, cycle
through three kinds:

  count     "How many shapes?"                -> one / two / three                   (chance 1/3)
  color     "What color is the <shape>?"      -> red / green / blue / yellow          (chance 1/4)
  position  "Where is the <color> shape?"     -> top left / top right / bottom left / bottom right   (chance 1/4)

A tiny DeepSeek-VL2 (SigLIP tower, 2 x 2 pixel-shuffle projector, a DeepSeek-V3-architecture language model with
sigmoid-routed experts and bias balancing) trains on freshly drawn scenes in VL2's chat format with the loss on
the answer only, then answers held-out scenes greedily through :func:`dsjax.infer.generate` with the images in
the prefill. Held-out scenes are drawn from their own random stream and never appear in training.

Besides chance, ``results.json`` gives the present-colour / present-quadrant baseline (naming one of the scene's
own colours or quadrants at random, ~61%): a model that sees colours but has not bound them to the asked shape
scores that much on ``color`` / ``position``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from dsjax.config import ModelConfig
from dsjax.data.tokenizer import ByteTokenizer
from dsjax.infer.engine import generate
from dsjax.train.config import TrainConfig
from dsjax.train.step import jit_train_step
from dsjax.vision.chat import VLProcessor, encode_vl_chat
from dsjax.vision.config import ProjectorConfig, TilingConfig, VisionConfig
from dsjax.vision.model import VLConfig, create_vl_model
from dsjax.vision.train import PARTS, chat_example, init_vl_train_state, make_vl_batch, make_vl_train_step

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("one", "two", "three")
KINDS = ("count", "color", "position")
CHANCE = {"count": 1 / 3, "color": 1 / 4, "position": 1 / 4}
IMAGE_SIZE = 32
QUESTIONS = (
    "How many shapes?",
    *(f"What color is the {s}?" for s in SHAPES),
    *(f"Where is the {c} shape?" for c in COLORS),
)
ANSWERS = (*COUNT_WORDS, *COLORS, *QUADRANTS)
# the reply is " " + answer + EOS in bytes: room for the longest one (12 cut " bottom right" to "bottom righ")
_MAX_NEW = len(" " + max(ANSWERS, key=len)) + 1
_DRAW_SCALE = 4  # shapes are drawn 4x larger, then downsampled (antialiased edges)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Shapes as ``(kind, color, quadrant, size, dx, dy)`` in pixels of the 32 x 32 image."""

    shapes: tuple[tuple[str, str, int, int, int, int], ...]

    def find(self, kind: str):
        return next(s for s in self.shapes if s[0] == kind)


def random_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 4))
    kinds = rng.permutation(len(SHAPES))[:n]
    quads = rng.permutation(len(QUADRANTS))[:n]
    colors = rng.permutation(len(COLORS))[:n]
    shapes = []
    for kind, quad, color in zip(kinds, quads, colors):
        color = list(COLORS)[int(color)]
        size = int(rng.integers(11, 15))
        dx, dy = (int(v) for v in rng.integers(-1, 2, 2))
        shapes.append((SHAPES[kind], color, int(quad), size, dx, dy))
    return Scene(tuple(shapes))


def draw_scene(scene: Scene) -> Image.Image:
    """The scene as a 32 x 32 RGB image on a white background."""
    s = _DRAW_SCALE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (255, 255, 255))
    draw = ImageDraw.Draw(big)
    half = IMAGE_SIZE // 2
    for kind, color, quad, size, dx, dy in scene.shapes:
        cx = (quad % 2) * half + half // 2 + dx
        cy = (quad // 2) * half + half // 2 + dy
        r = size / 2
        box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
        fill = COLORS[color]
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx * s, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def question(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """``(question, answer)`` of ``kind`` about ``scene`` (color / position ask about one of its shapes, named by
    kind or by colour: both are unique within a scene)."""
    if kind == "count":
        return "How many shapes?", COUNT_WORDS[len(scene.shapes) - 1]
    shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
    if kind == "color":
        return f"What color is the {shape[0]}?", shape[1]
    return f"Where is the {shape[1]} shape?", QUADRANTS[shape[2]]


@dataclasses.dataclass(frozen=True)
class Example:
    scene: Scene
    kind: str
    question: str
    answer: str


def make_examples(rng: np.random.Generator, n: int, *, exclude=frozenset(), offset: int = 0) -> list[Example]:
    """``n`` examples whose question kinds cycle (from ``offset``); scenes in ``exclude`` are drawn again."""
    out = []
    while len(out) < n:
        scene = random_scene(rng)
        if scene in exclude:
            continue
        kind = KINDS[(offset + len(out)) % len(KINDS)]
        out.append(Example(scene, kind, *question(scene, kind, rng)))
    return out


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """The job's settings (``scripts/vl.py`` flags)."""

    seed: int = 0
    steps: int = 1800
    batch_size: int = 32
    lr: float = 6e-3
    warmup_steps: int = 30
    eval_size: int = 240
    eval_batch: int = 64
    trainable: tuple[str, ...] = PARTS
    log_every: int = 50
    patch_size: int = 8


def model_config(patch_size: int = 8) -> VLConfig:
    """Tower: 32 px, ``patch_size`` px patches (8 px: 4 x 4), 2 layers, 48 wide; projector 2 x 2 shuffle ->
    2 x 2 tokens per tile; language model: one dense and one MoE layer (8 sigmoid-routed experts, top 2, bias
    balancing).

    With 8 px patches each image token after the shuffle is exactly one quadrant of the scene (shapes are drawn
    inside their quadrant), so a token holds one whole shape and "where" is "which token".
    """
    language = ModelConfig.tiny(vocab_size=264, num_hidden_layers=2, num_nextn_predict_layers=0)
    return VLConfig(
        language=language,
        vision=VisionConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=patch_size,
        ),
        projector=ProjectorConfig(input_dim=48, n_embed=language.hidden_size),
        tiling=TilingConfig(image_size=IMAGE_SIZE, patch_size=patch_size, downsample_ratio=2, max_tiles=1),
        image_token_id=262,  # never produced by the byte tokenizer
    )  # fmt: skip


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """``[grid * grid, dim]`` 2-D sine-cosine position codes: half the channels encode the row, half the column,
    each as sines and cosines of geometrically spaced frequencies (MAE, He et al. 2021)."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def code(pos):
        angles = pos.reshape(-1, 1) * freqs[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([code(rows), code(cols)], axis=1)
    return np.pad(table, ((0, 0), (0, dim - table.shape[1]))).astype(np.float32)


def present_baseline(examples: list[Example]) -> dict:
    """Accuracy of naming a random one of the scene's own colours / quadrants (ignoring which shape is asked
    about): what a model that sees the colours but cannot bind them to the asked shape scores, above chance."""
    return {
        k: float(np.mean([1 / len(e.scene.shapes) for e in examples if e.kind == k])) for k in ("color", "position")
    }


def _messages(ex: Example):
    return [{"role": "user", "content": ex.question, "images": [draw_scene(ex.scene)]}]


def evaluate(model, processor: VLProcessor, examples: list[Example], batch: int) -> tuple[dict, list[str]]:
    """Greedy answers through the generation engine (images spliced in the prefill); exact-match accuracy per
    question kind and overall."""
    tok = processor.tokenizer
    answers = []
    for i in range(0, len(examples), batch):
        chunk = [encode_vl_chat(processor, _messages(ex)) for ex in examples[i : i + batch]]
        out = generate(
            model, [x.tokens for x in chunk], images=[x.images for x in chunk], max_new_tokens=_MAX_NEW,
            temperature=0.0, stop_tokens=[tok.eos_id],
        )  # fmt: skip
        answers += [tok.decode([t for t in row if t != tok.eos_id]).strip() for row in out]
    acc = {}
    for kind in KINDS:
        hits = [a == ex.answer for a, ex in zip(answers, examples) if ex.kind == kind]
        acc[kind] = sum(hits) / max(len(hits), 1)
    acc["all"] = sum(a == ex.answer for a, ex in zip(answers, examples)) / len(examples)
    return acc, answers


def save_grid(examples: list[Example], answers: list[str], path: str, columns: int = 6, rows: int = 4) -> None:
    """A PNG of held-out scenes (upscaled 4x) with question, the model's answer (green right, red wrong) and the
    truth."""
    cell_w, img = 168, 128
    cell_h = img + 46
    n = min(len(examples), columns * rows)
    grid = Image.new("RGB", (columns * cell_w, math.ceil(n / columns) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        ex, ans = examples[i], answers[i]
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(draw_scene(ex.scene).resize((img, img), Image.NEAREST), (x + (cell_w - img) // 2, y + 2))
        draw.rectangle([x + (cell_w - img) // 2, y + 2, x + (cell_w + img) // 2, y + 2 + img], outline=(160,) * 3)
        draw.text((x + 4, y + img + 5), ex.question, fill=(0, 0, 0))
        ok = ans == ex.answer
        draw.text((x + 4, y + img + 18), f"model: {ans}", fill=(0, 140, 0) if ok else (200, 0, 0))
        if not ok:
            draw.text((x + 4, y + img + 31), f"truth: {ex.answer}", fill=(90, 90, 90))
    grid.save(path)


def run(cfg: JobConfig, out_dir: str, log=print) -> dict:
    """Train, evaluate before and after, write ``results.json`` and ``heldout.png`` to ``out_dir``."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    os.makedirs(out_dir, exist_ok=True)
    vl_cfg = model_config(cfg.patch_size)
    tok = ByteTokenizer()
    processor = VLProcessor(tok, image_token_id=vl_cfg.image_token_id, tiling=vl_cfg.tiling)
    held_rng, train_rng = (np.random.default_rng([cfg.seed, stream]) for stream in (1, 2))
    heldout = make_examples(held_rng, cfg.eval_size)
    held_scenes = frozenset(ex.scene for ex in heldout)

    model = create_vl_model(vl_cfg, seed=cfg.seed)
    # 2-D sin-cos codes as the position table's start (MAE's fixed table): from random codes, this small run
    # learns where a shape is far more slowly than what it is
    model.vision.pos_embed.set_value(sincos_positions(vl_cfg.vision.grid_size, vl_cfg.vision.hidden_size))
    t0 = time.perf_counter()
    before, _ = evaluate(model, processor, heldout, cfg.eval_batch)
    log(f"held-out accuracy before training: {_fmt(before)}  ({time.perf_counter() - t0:.0f}s)")

    tc = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                     balance_alpha=0.0, mtp_lambda=0.0, seed=cfg.seed)  # fmt: skip
    graphdef, state, tx = init_vl_train_state(model, tc, trainable=cfg.trainable)
    step = jit_train_step(make_vl_train_step(graphdef, vl_cfg, tc, tx, trainable=cfg.trainable))
    # the longest question with the longest answer: every batch pads to it, so one compiled step serves all
    longest = Example(heldout[0].scene, "color", max(QUESTIONS, key=len), max(ANSWERS, key=len))
    length = len(chat_example(processor, _messages(longest), longest.answer)[0].tokens)
    losses, t_train = [], time.perf_counter()
    for i in range(cfg.steps):
        exs = make_examples(train_rng, cfg.batch_size, exclude=held_scenes, offset=i)
        pairs = [chat_example(processor, _messages(ex), ex.answer) for ex in exs]
        batch = make_vl_batch([p[0] for p in pairs], [p[1] for p in pairs], pad_id=tok.pad_id,
                              image_token_id=vl_cfg.image_token_id, length=length)  # fmt: skip
        state, metrics = step(state, batch)
        if (i + 1) % cfg.log_every == 0 or i == 0:
            loss = float(metrics["ce"])
            losses.append((i + 1, loss))
            log(f"step {i + 1:4d}  answer loss {loss:.4f}  ({time.perf_counter() - t_train:.0f}s)")
    train_seconds = time.perf_counter() - t_train
    model = nnx.merge(graphdef, state.params, state.rest)  # the trained weights (the old ones were donated)
    t0 = time.perf_counter()
    after, answers = evaluate(model, processor, heldout, cfg.eval_batch)
    log(f"held-out accuracy after training:  {_fmt(after)}  ({time.perf_counter() - t0:.0f}s)")
    save_grid(heldout, answers, os.path.join(out_dir, "heldout.png"))
    results = dict(
        seed=cfg.seed, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, patch_size=cfg.patch_size,
        trainable=list(cfg.trainable),
        heldout_examples=len(heldout), accuracy_before=before, accuracy_after=after, chance=CHANCE,
        present_baseline=present_baseline(heldout),
        answer_loss=losses, train_seconds=round(train_seconds, 1), load_average=[round(x, 1) for x in os.getloadavg()],
        total_seconds=round(time.perf_counter() - t_start, 1),
        cpu_seconds=round(time.process_time() - cpu_start, 1),  # all threads: contention shows in wall time
        samples=[dict(question=ex.question, answer=ex.answer, model=a) for ex, a in zip(heldout[:24], answers)],
    )  # fmt: skip
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def _fmt(acc: dict) -> str:
    return "  ".join(f"{k} {acc[k]:.1%}" + (f" (chance {CHANCE[k]:.0%})" if k in CHANCE else "") for k in acc)
