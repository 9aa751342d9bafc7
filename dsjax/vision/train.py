"""Training a :class:`~dsjax.vision.model.VisionLanguageModel` on prompts with images.

The step is :func:`dsjax.train.step.make_train_step` (loss, MTP, balance loss, auxiliary-loss-free bias update,
skipping of non-finite steps) with the vision-language forward plugged in: image embeddings are written over the
placeholder runs, and the routers and output head are found under ``language``. Batches use the language
model's layout (``tokens``, ``positions``, ``segment_ids``, ``targets``, ``loss_mask``) plus ``pixels`` and
``source`` (:class:`~dsjax.vision.model.ImageBatch`); ``loss_mask`` is set on answer tokens only, so image
placeholders and the prompt get no loss (VL2's labels of -100).

Freezing: ``trainable`` names the parts that train (``vision``, ``projector``, ``image_newline``,
``view_seperator``, ``language``). The others are split off with the routing biases into ``TrainState.rest``:
they get no gradient, no optimizer state and never change (VL2's stage 1 trains the tower and the adaptor with
the language model frozen; DeepSeek-VL's stage 1 the adaptor alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsjax.train.config import TrainConfig
from dsjax.train.optim import learning_rate
from dsjax.train.step import TrainState, _check_trainable, make_train_step
from dsjax.vision.chat import VLInputs, VLProcessor, encode_vl_chat
from dsjax.vision.model import VisionLanguageModel, VLConfig, batch_images

PARTS = ("vision", "projector", "image_newline", "view_seperator", "language")
ADAPTER = ("projector", "image_newline", "view_seperator")  # DeepSeek-VL stage 1: the adaptor alone


def trainable_filter(parts: Sequence[str] = PARTS):
    """An nnx filter selecting the ``nnx.Param`` leaves of the named top-level parts."""
    parts = tuple(parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"trainable parts {unknown or '()'}: choose a non-empty subset of {PARTS}")
    return lambda path, value: isinstance(value, nnx.Param) and bool(path) and path[0] in parts


def decay_mask(params: nnx.State):
    """Weight decay on matrices only: not on norm scales, biases or the two special embeddings (all 1-D)."""
    return jax.tree.map(lambda v: v.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    """AdamW as :func:`dsjax.train.optim.make_optimizer` builds it (global-norm clipping, the run's schedule,
    ``b1`` / ``b2`` / ``weight_decay`` / ``moment_dtype``), with two differences: :func:`decay_mask` (the tower's
    LayerNorm ``scale`` / ``bias`` and linear biases are not decayed either), and the moments are one flat
    vector (``optax.flatten``): a VL model has many small leaves, and per-leaf Adam updates cost the tiny CPU
    job ~13x more step time than the one flat update (2.8 s vs 0.22 s of CPU per step, measured on a
    heavily loaded 2-core machine)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.flatten(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8, mu_dtype=jnp.dtype(cfg.moment_dtype))),
        optax.add_decayed_weights(cfg.weight_decay, decay_mask(params)),
        optax.scale_by_learning_rate(learning_rate(cfg)),
    )


def init_vl_train_state(model: VisionLanguageModel, cfg: TrainConfig, *, trainable: Sequence[str] = PARTS):
    """Split ``model`` into graphdef, trainable params and the rest (frozen params + routing biases); build the
    optimizer over the trainable params. Returns ``(graphdef, TrainState, tx)``."""
    if model.vision is None and set(trainable) & {"vision", "projector", "image_newline", "view_seperator"}:
        raise ValueError("this model has no vision tower; train 'language' only")
    graphdef, params, rest = nnx.split(model, trainable_filter(trainable), ...)
    _check_trainable(params)
    tx = make_optimizer(cfg, params)
    opt_state = jax.jit(tx.init)(params)  # one flat moment vector: placed by the partitioner (single-device job)
    zeros = [jnp.zeros((), jnp.int32) for _ in range(3)]  # distinct buffers: the state is donated
    return graphdef, TrainState(zeros[0], params, rest, opt_state, zeros[1], zeros[2]), tx


def _vl_forward(model, batch, **options):
    return model.forward(batch["tokens"], batch.get("pixels"), batch.get("source"), **options)


def make_vl_train_step(
    graphdef: nnx.GraphDef,
    vl_cfg: VLConfig,
    cfg: TrainConfig,
    tx,
    *,
    trainable: Sequence[str] = PARTS,
    update_bias: bool | None = None,
):
    """The train step ``(state, batch) -> (state, metrics)`` of :func:`dsjax.train.step.make_train_step` over a
    vision-language model (jit it with :func:`dsjax.train.step.jit_train_step`).

    ``update_bias`` (auxiliary-loss-free balancing of the language model's routers, speed ``cfg.bias_gamma``):
    default on exactly when ``language`` is trainable, so a frozen language model stays frozen."""
    if update_bias is None:
        update_bias = "language" in trainable
    if not update_bias:
        cfg = dataclasses.replace(cfg, bias_gamma=0.0)
    return make_train_step(graphdef, vl_cfg.language, cfg, tx, forward_fn=_vl_forward, language_path=("language",))


def chat_example(processor: VLProcessor, messages, answer: str, *, cropping: bool | None = None):
    """One training example: the conversation ``messages`` (its images in the messages' ``images``) as a prompt
    ending in the generation prompt, then ``" " + answer`` and the EOS id. Returns ``(VLInputs, loss_from)``:
    the first ``loss_from`` tokens are the prompt (no loss)."""
    prompt = encode_vl_chat(processor, messages, add_generation_prompt=True, cropping=cropping)
    tok = processor.tokenizer
    reply = np.concatenate([np.asarray(tok.encode(" " + answer), np.int32), np.array([tok.eos_id], np.int32)])
    return prompt._replace(tokens=np.concatenate([prompt.tokens, reply])), len(prompt.tokens)


def make_vl_batch(
    examples: Sequence[VLInputs],
    loss_from: Sequence[int] | None,
    *,
    pad_id: int,
    image_token_id: int,
    length: int | None = None,
) -> dict:
    """A train batch (numpy) of right-padded examples.

    ``targets[:, i]`` is token ``i + 1``; ``loss_mask`` keeps a target when it lies inside its row, is not an
    image placeholder and is at index ``>= loss_from[row]`` (None: every text token after the first).
    ``segment_ids`` are 1 on real tokens and 0 on padding (the balance statistics skip padding).
    """
    longest = max(len(x.tokens) for x in examples)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest example ({longest} tokens)")
    b = len(examples)
    tokens = np.full((b, length), pad_id, np.int32)
    seg = np.zeros((b, length), np.int32)
    start = np.ones(b, np.int64) if loss_from is None else np.asarray(loss_from, np.int64)
    if len(start) != b:
        raise ValueError(f"{len(start)} loss_from entries for {b} examples")
    for row, x in enumerate(examples):
        if not 1 <= start[row] <= len(x.tokens):
            raise ValueError(f"loss_from[{row}]={start[row]} is outside [1, {len(x.tokens)}]")
        tokens[row, : len(x.tokens)] = x.tokens
        seg[row, : len(x.tokens)] = 1
    targets = np.concatenate([tokens[:, 1:], np.full((b, 1), pad_id, np.int32)], axis=1)
    index = np.arange(length)[None] + 1  # the target's own index
    mask = (seg == 1) & (np.concatenate([seg[:, 1:], np.zeros((b, 1), np.int32)], 1) == 1)
    mask &= (targets != image_token_id) & (index >= start[:, None])
    batch = dict(
        tokens=tokens,
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
        segment_ids=seg,
        targets=targets,
        loss_mask=mask,
    )
    images = [image for x in examples for image in x.images]
    if images:
        merged = batch_images(images)
        batch.update(pixels=merged.pixels, source=merged.source)
    return batch
