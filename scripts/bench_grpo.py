"""``bench.py grpo``: GRPO steps of dsjax vs TRL's ``GRPOTrainer`` on the same tiny model (HF transformers).

Both sides run the same work per step: ``--questions`` prompts x ``--G`` completions of exactly
``--completion-len`` sampled tokens (temperature 1, no stop token), one reward function, one policy update
(beta = 0, epsilon = 0.2, sequence-mean loss on both: TRL's ``loss_type="grpo"``). Reported: rollout tokens/s
(generation time only: dsjax's engine vs the HF ``generate`` TRL calls, timed inside TRL), update steps/s (the
rest of a step) and whole steps/s; ``ratio`` is dsjax's steps/s over TRL's.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from bench_common import load_same_weights, machine_info, make_hf, print_table, register

from dsjax.rl import GRPOConfig, Reward
from dsjax.rl.tasks import Problem
from dsjax.rl.trainer import RLTrainConfig, train_grpo


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (after one warm-up step)")


def _digits(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


class _IdTask:
    """Fixed prompts given as text of token ids (so both sides see identical prompt tokens)."""

    def __init__(self, prompts):
        self.prompts = prompts

    def sample(self, n, split, rng):
        return [Problem(self.prompts[int(i)], "0", {"answer": "0"}) for i in rng.integers(len(self.prompts), size=n)]

    def rewards(self):
        return [Reward(_digits, 1.0, "accuracy")]


class _IdTokenizer:
    """Text <-> ids as space-separated integers: lets the dsjax loop feed TRL's exact prompt ids."""

    bos_id, eos_id = 0, 1

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _dsjax(args, hf, prompts) -> dict:
    model = load_same_weights(hf)
    cfg = GRPOConfig(G=args.G, epsilon=0.2, beta=0.0, max_completion_length=args.completion_len,
                     learning_rate=1e-5)  # fmt: skip
    tok = _IdTokenizer()
    task = _IdTask([" ".join(map(str, p[1:])) for p in prompts])
    with tempfile.TemporaryDirectory() as out:
        tc = RLTrainConfig(steps=args.steps + 1, questions=args.questions, checkpoint_every=10**6)
        # eos 1 never stops a row here: the reward / length work is identical on both sides
        import dsjax.rl.trainer as trainer

        original = trainer.generate
        timings = []

        def timed_generate(*a, **kw):
            kw["stop_tokens"] = ()
            start = time.perf_counter()
            out_ = original(*a, **kw)
            timings.append(time.perf_counter() - start)
            return out_

        trainer.generate = timed_generate
        try:
            train_grpo(model, tok, task, cfg, tc, out, progress=False)
        finally:
            trainer.generate = original
        from dsjax.train.metrics import read_jsonl

        steps = read_jsonl(os.path.join(out, "metrics.jsonl"))[1:]  # the first step compiles
    step_s = statistics.median(r["step_s"] for r in steps)
    gen_s = statistics.median(timings[1:])
    return dict(step_s=step_s, rollout_s=gen_s, update_s=step_s - gen_s)


def _trl(args, hf, prompts) -> dict:
    import torch

    try:
        from datasets import Dataset
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer
    except ModuleNotFoundError as e:
        raise SystemExit(f"bench.py grpo needs the peer, TRL ({e.name} is missing): pip install -e '.[bench]'") from e
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(hf.config.vocab_size)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="0", eos_token="1", pad_token="2")
    data = Dataset.from_list([{"prompt": " ".join(map(str, p[1:]))} for p in prompts])
    gen_times = []
    original = type(hf).generate

    def timed(self, *a, **kw):
        kw["min_new_tokens"] = args.completion_len  # the same number of tokens as dsjax generates
        start = time.perf_counter()
        out = original(self, *a, **kw)
        gen_times.append(time.perf_counter() - start)
        return out

    type(hf).generate = timed
    step_times = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        cfg = TRLConfig(output_dir=out, per_device_train_batch_size=args.questions * args.G, num_generations=args.G,
                        max_completion_length=args.completion_len, max_steps=args.steps + 1, learning_rate=1e-5,
                        beta=0.0, epsilon=0.2, loss_type="grpo", temperature=1.0, use_cpu=True, bf16=False,
                        report_to="none", save_strategy="no", logging_steps=1, num_iterations=1,
                        gradient_accumulation_steps=1, dataloader_num_workers=0)  # fmt: skip
        torch.manual_seed(0)
        trainer = GRPOTrainer(model=hf, reward_funcs=_digits, args=cfg, train_dataset=data, processing_class=tok,
                              callbacks=[Timer()])  # fmt: skip
        try:
            trainer.train()
        finally:
            type(hf).generate = original
    step_s = statistics.median(step_times[1:])
    gen_s = statistics.median(gen_times[1:])
    return dict(step_s=step_s, rollout_s=gen_s, update_s=step_s - gen_s)


@register("grpo", "GRPO rollout tokens/s and update steps/s of dsjax vs TRL GRPOTrainer (tiny model, CPU)", _args)
def grpo(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.set_flush_denormal(True)
    hf = make_hf(args.config, args.seed).float()
    rng = np.random.default_rng(args.seed)
    prompts = [[0, *rng.integers(3, hf.config.vocab_size, 12).tolist()] for _ in range(64)]
    ours = _dsjax(args, hf, prompts)
    theirs = _trl(args, hf.train(), prompts)
    tokens = args.questions * args.G * args.completion_len
    rows = []
    for name, r in (("dsjax", ours), ("TRL", theirs)):
        rows.append((name, f"{tokens / r['rollout_s']:,.0f}", f"{1 / r['update_s']:.2f}", f"{1 / r['step_s']:.2f}"))
    info = machine_info()
    print(f"grpo  config={args.config} {args.questions} questions x G={args.G} x {args.completion_len} tokens, "
          f"float32; {info['cpu_count']} CPUs, load {info['loadavg_1min']}")  # fmt: skip
    print_table(("", "rollout tokens/s", "update steps/s", "steps/s"), rows)
    ratio = theirs["step_s"] / ours["step_s"]
    print(f"ratio dsjax/TRL (whole steps): {ratio:.2f}x; rollout {theirs['rollout_s'] / ours['rollout_s']:.2f}x, "
          f"update {theirs['update_s'] / ours['update_s']:.2f}x")  # fmt: skip
    return dict(mode="grpo", config=args.config, questions=args.questions, G=args.G,
                completion_len=args.completion_len, dsjax=ours, trl=theirs, ratio=ratio,
                rollout_ratio=theirs["rollout_s"] / ours["rollout_s"],
                update_ratio=theirs["update_s"] / ours["update_s"], **info)  # fmt: skip
