"""Generate text from a checkpoint, streaming tokens to the terminal.

  python scripts/generate.py --checkpoint runs/train_tiny --prompt "count up: 1 2 3"
  python scripts/generate.py --checkpoint DIR --chat --prompt "What is MLA?" --temperature 0.6 --top-p 0.95
  python scripts/generate.py --checkpoint DIR --prompt "def fib(n):" --speculative
  python scripts/generate.py --checkpoint VL_DIR --image cat.png --chat --prompt "What is in the picture?"

``--checkpoint`` is an HF-format directory (config.json + safetensors, e.g. a DeepSeek release or
``save_pretrained`` output) or a training run directory (its ``hf/`` export), or a DeepSeek-VL2-layout
vision-language checkpoint (``dsjax.vision.save_vl``; its config.json has a ``vision_config``). The tokenizer is
the directory's ``tokenizer.json`` when present, else dsjax's byte tokenizer (what ``scripts/train.py`` trains
with).

``--image PATH`` (repeatable, vision-language checkpoints, one prompt) fills the prompt's ``<image>`` markers
in order; a prompt without markers gets one ``<image>`` line per image in front. With ``--chat`` the prompt is
VL2's conversation format (``<|User|>: ...\\n\\n<|Assistant|>:``).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import sys
import time

import jax.numpy as jnp

import dsjax
from dsjax.data.tokenizer import ByteTokenizer, HFTokenizer
from dsjax.hf_config import read_config_json
from dsjax.infer import encode_prompts, stream
from dsjax.runtime import preload_allocator


def resolve_checkpoint(path: str) -> str:
    for candidate in (path, os.path.join(path, "hf")):
        if os.path.exists(os.path.join(candidate, "config.json")):
            return candidate
    raise SystemExit(f"error: no config.json in {path} or {path}/hf (an HF checkpoint or a training run directory)")


def load_tokenizer(spec: str | None, checkpoint: str, vocab_size: int):
    if spec is None:
        found = os.path.join(checkpoint, "tokenizer.json")
        spec = found if os.path.exists(found) else "byte"
    tok = ByteTokenizer() if spec == "byte" else HFTokenizer.from_file(spec)
    if tok.vocab_size > vocab_size:
        raise SystemExit(f"error: tokenizer {spec} has {tok.vocab_size} ids, the model only {vocab_size}")
    return tok


def vl_prompt(args, model, tok):
    """The one prompt of a vision-language run with its images: ``([ids], [processed images])``."""
    from PIL import Image

    from dsjax.vision.chat import IMAGE_MARKER, VLProcessor, encode_vl_chat

    if len(args.prompt) != 1:
        raise SystemExit("error: a vision-language checkpoint takes one --prompt (its images: --image, repeated)")
    pictures = []
    for name in args.image:
        try:
            with Image.open(name) as im:
                pictures.append(im.convert("RGB"))
        except OSError as e:
            raise SystemExit(f"error: cannot read image {name}: {e}") from None
    cfg = model.config
    if pictures and cfg.image_token_id is None:
        raise SystemExit("error: this checkpoint's config has no image_token_id")
    processor = VLProcessor(tok, image_token_id=cfg.image_token_id or 0, tiling=cfg.tiling)
    text = args.prompt[0]
    try:
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            inputs = encode_vl_chat(processor, [*system, {"role": "user", "content": text, "images": pictures}])
        else:
            if pictures and IMAGE_MARKER not in text:
                text = (IMAGE_MARKER + "\n") * len(pictures) + text
            inputs = processor(text, pictures)
    except ValueError as e:  # markers and images disagree
        raise SystemExit(f"error: {e}") from None
    return [inputs.tokens.tolist()], [inputs.images]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory or training run directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of DeepSeek's template")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--chat-style", choices=("v3", "v2"), default="v3")
    p.add_argument("--think", action="store_true", help="R1 style: open the answer with <think> (with --chat)")
    p.add_argument("--tokenizer", help="tokenizer.json path or 'byte' (default: the checkpoint's, else byte)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true", help="MTP drafting, verified by the main model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute and cache dtype")
    p.add_argument("--image", action="append", default=[], help="image file (repeat; vision-language checkpoints)")
    args = p.parse_args(argv)

    path = resolve_checkpoint(args.checkpoint)
    images = None
    if "vision_config" in read_config_json(path):
        from dsjax.vision.checkpoint import load_vl

        model = load_vl(path, dtype=jnp.dtype(args.dtype))
        tok = load_tokenizer(args.tokenizer, path, model.config.language.vocab_size)
        ids, images = vl_prompt(args, model, tok)
    elif args.image:
        raise SystemExit(f"error: --image needs a vision-language checkpoint; {path} has no vision_config")
    else:
        model = dsjax.from_pretrained(path, dtype=jnp.dtype(args.dtype))
        tok = load_tokenizer(args.tokenizer, path, model.config.vocab_size)
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            prompts = [[*system, {"role": "user", "content": text}] for text in args.prompt]
            ids = encode_prompts(tok, prompts, style=args.chat_style, think=args.think)
        else:
            ids = encode_prompts(tok, args.prompt)
    try:
        pieces = stream(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop_tokens=[tok.eos_id],
                        speculative=args.speculative, images=images)  # fmt: skip
        start = time.perf_counter()
        outs, printed, steps = [[] for _ in ids], "", 0
        for step in pieces:
            for row, new in zip(outs, step):
                row.extend(new)
            steps += 1
            if len(ids) == 1:  # stream one prompt as it grows (decoding the whole text handles multi-byte tokens)
                text = tok.decode([t for t in outs[0] if t != tok.eos_id])
                if not text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
                    sys.stdout.write(text[len(printed) :])
                    sys.stdout.flush()
                    printed = text
    except ValueError as e:  # bad prompt / sampling settings: one clear line, no traceback
        raise SystemExit(f"error: {e}") from None
    elapsed = time.perf_counter() - start
    if len(ids) == 1:  # whatever was held back (invalid UTF-8 at the very end is printed as U+FFFD)
        print(tok.decode([t for t in outs[0] if t != tok.eos_id])[len(printed) :])
    else:
        for i, row in enumerate(outs):
            print(f"--- prompt {i}: {args.prompt[i]!r}\n{tok.decode([t for t in row if t != tok.eos_id])}")
    new = sum(map(len, outs))
    print(f"[{new} tokens in {elapsed:.2f}s incl. compilation, {new / max(steps - 1, 1) / len(ids):.2f} tokens per "
          f"decode step per prompt]", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    preload_allocator()  # re-executes once with mimalloc (see dsjax/runtime.py)
    sys.exit(main())
