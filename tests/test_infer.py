"""Generation with the latent KV cache: decode consistency, speculative decoding, sampling, stops, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.infer import (
    cache_bytes_per_token,
    forward_cached,
    generate,
    init_cache,
    mha_values_per_token,
    stream,
)
from dsjax.sharding import make_mesh, state_shardings

CFG = dsjax.ModelConfig.tiny(initializer_range=0.1)
PROMPT_LENGTHS = (3, 9, 17, 30)  # ragged, spanning two prompt buckets' worth of padding


def _prompts(seed=0, lengths=PROMPT_LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    m = dsjax.create_model(CFG, seed=1)
    bias = m.moe_layers.ffn.routing_bias
    bias.set_value(0.1 * jax.random.normal(jax.random.key(5), bias.get_value().shape))
    return m


@pytest.fixture(scope="module")
def drafting_model():
    """A model whose MTP module often, but not always, drafts what the main model will say.

    The MTP layer is made the identity on the next token's embedding (its attention and FFN outputs zeroed,
    eh_proj selecting the embedding half), so it predicts head(norm(emb(t_{i+1}))). The main model's layer
    outputs are scaled down, so its prediction at i+1 is close to that: drafts are accepted about half the time,
    exercising both the accept and the reject paths.
    """
    m = dsjax.create_model(CFG, seed=3)
    d = CFG.hidden_size
    m.mtp.eh_proj.set_value(jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))])[None])
    for v in (m.mtp.layer.attn.wo, m.mtp.layer.ffn.w_down, m.mtp.layer.ffn.shared.w_down):
        v.set_value(jnp.zeros_like(v.get_value()))
    for v in (m.dense_layers.attn.wo, m.dense_layers.ffn.w_down, m.moe_layers.attn.wo, m.moe_layers.ffn.w_down,
              m.moe_layers.ffn.shared.w_down):  # fmt: skip
        v.set_value(0.05 * v.get_value())
    return m


@pytest.mark.parametrize("attention", ["absorbed", "naive"])
def test_greedy_cached_decode_is_argmax_of_full_forward(model, attention):
    prompts = _prompts()
    out = generate(model, prompts, max_new_tokens=12, stop_tokens=(), attention=attention)
    for prompt, new in zip(prompts, out):
        assert len(new) == 12
        seq = np.asarray([prompt + new], np.int32)
        # One causal forward over the final sequence gives every step's logits over the growing prefix.
        logits = np.asarray(model(seq))[0]
        expected = logits[len(prompt) - 1 : -1].argmax(-1)
        np.testing.assert_array_equal(new, expected)


def test_prefill_and_step_logits_match_full_forward(model):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 10)), jnp.int32)
    full = model(tokens)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
        cache = init_cache(CFG.num_hidden_layers, 2, 16, CFG, jnp.float32)
        pre, _, cache = forward_cached(m, tokens[:, :6], pos[:, :6], cache, fresh=True, attention="naive")
        steps = []
        for i in range(6, 10):  # then one token at a time over the cache, absorbed
            logits, _, cache = forward_cached(m, tokens[:, i : i + 1], pos[:, i : i + 1], cache)
            steps.append(logits)
        return jnp.concatenate([pre, *steps], axis=1), cache

    logits, cache = run(state, tokens)
    chex.assert_trees_all_close(logits, full, atol=1e-5, rtol=1e-5)
    # The cache holds kv_lora_rank + rope dims per token and layer, and no head axis.
    chex.assert_shape(cache.c_kv, (CFG.num_hidden_layers, 2, 16, CFG.kv_lora_rank))
    chex.assert_shape(cache.k_pe, (CFG.num_hidden_layers, 2, 16, CFG.qk_rope_head_dim))


def test_cache_size_of_deepseek_v3():
    v3 = dsjax.ModelConfig.deepseek_v3()
    assert cache_bytes_per_token(v3, jnp.bfloat16) == 61 * 576 * 2 == 70_272
    assert mha_values_per_token(v3) == 61 * 32_768


def test_speculative_greedy_equals_plain_greedy(drafting_model):
    prompts = _prompts(seed=2)
    plain = generate(drafting_model, prompts, max_new_tokens=20, stop_tokens=())
    spec = generate(drafting_model, prompts, max_new_tokens=20, stop_tokens=(), speculative=True, return_result=True)
    assert spec.tokens == plain
    assert 0 < spec.accepted < spec.drafted  # both the accept and the reject path ran
    assert spec.decode_steps < 19  # accepted drafts saved model calls


def test_drafts_are_the_mtp_modules_predictions(drafting_model):
    """Replay speculative decoding on the final sequences with the full (uncached) MTP forward: the counts of
    drafted and accepted tokens must match, so each draft was MTP's prediction from the right context."""
    prompts, n = _prompts(seed=6), 16
    spec = generate(drafting_model, prompts, max_new_tokens=n, stop_tokens=(), speculative=True, return_result=True)
    drafted = accepted = 0
    for prompt, new in zip(prompts, spec.tokens):
        seq = prompt + new
        _, mtp_logits = drafting_model(np.asarray([seq], np.int32), return_mtp=True)
        guess = np.asarray(mtp_logits)[0, 0].argmax(-1)  # guess[i] predicts token i + 2
        p, count = len(prompt), 1  # position of the last emitted token; tokens emitted
        while count < n:
            drafted += 1
            count += 1
            if guess[p - 1] == seq[p + 1]:  # the draft for position p + 1 came from MTP at p - 1
                accepted += 1
                count += count < n
                p += 2
            else:
                p += 1
    assert (spec.drafted, spec.accepted) == (drafted, accepted)


def test_speculative_respects_stop_tokens(drafting_model):
    prompts = _prompts(seed=2)
    full = generate(drafting_model, prompts, max_new_tokens=20, stop_tokens=())
    stop = full[0][5]
    plain = generate(drafting_model, prompts, max_new_tokens=20, stop_tokens=[stop])
    spec = generate(drafting_model, prompts, max_new_tokens=20, stop_tokens=[stop], speculative=True)
    assert spec == plain
    for row, ref in zip(plain, full):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]


def test_stop_tokens_end_rows(model):
    prompts = _prompts()
    full = generate(model, prompts, max_new_tokens=16, stop_tokens=())
    stop = full[1][4]
    stopped = generate(model, prompts, max_new_tokens=16, stop_tokens=[stop])
    assert stopped[1] == full[1][: full[1].index(stop) + 1]
    for row, ref in zip(stopped, full):
        assert row == (ref[: ref.index(stop) + 1] if stop in ref else ref)


def test_sampling_is_reproducible_and_seeded(model):
    prompts = _prompts()
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, stop_tokens=())
    a, b = generate(model, prompts, seed=7, **kw), generate(model, prompts, seed=7, **kw)
    assert a == b
    assert generate(model, prompts, seed=8, **kw) != a
    # A row's samples depend on the seed and its row, not on the rest of the batch or its padding.
    assert generate(model, prompts[:1], seed=7, **kw)[0] == a[0]


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompts = _prompts()
    greedy = generate(model, prompts, max_new_tokens=8, stop_tokens=())
    assert generate(model, prompts, max_new_tokens=8, temperature=1.5, top_k=1, stop_tokens=(), seed=3) == greedy
    assert generate(model, prompts, max_new_tokens=8, temperature=1.5, top_p=1e-6, stop_tokens=(), seed=3) == greedy


def test_speculative_sampling_is_reproducible(drafting_model):
    prompts = _prompts(seed=4)
    kw = dict(max_new_tokens=12, temperature=0.7, stop_tokens=(), speculative=True, return_result=True)
    a, b = generate(drafting_model, prompts, seed=1, **kw), generate(drafting_model, prompts, seed=1, **kw)
    assert a.tokens == b.tokens and a.accepted > 0
    assert all(len(r) == 12 for r in a.tokens)


@pytest.mark.parametrize("speculative", [False, True])
def test_stream_yields_what_generate_returns(drafting_model, speculative):
    prompts = _prompts(seed=5, lengths=(4, 11))
    kw = dict(max_new_tokens=9, stop_tokens=(), speculative=speculative)
    pieces = list(stream(drafting_model, prompts, **kw))
    joined = [[t for p in pieces for t in p[i]] for i in range(len(prompts))]
    assert joined == generate(drafting_model, prompts, **kw)
    assert len(pieces) > 2  # tokens arrive step by step


def test_sharded_generation_equals_single_device(model):
    prompts = _prompts(lengths=(5, 8, 13))
    ref = generate(model, prompts, max_new_tokens=8, stop_tokens=())
    mesh = make_mesh(data=2, expert=4)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    with jax.set_mesh(mesh):
        out = generate(sharded, prompts, max_new_tokens=8, stop_tokens=())
    assert out == ref


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "non-empty list"),
        ([[1, 2], []], {}, ValueError, "prompt 1 is empty"),
        ([1, 2, 3], {}, ValueError, r"pass \[ids\]"),
        ([[1, 2.5]], {}, TypeError, "integer token ids"),
        ([[1, 999]], {}, ValueError, "outside"),
        ([[1] * 500], {"max_new_tokens": 20}, ValueError, "max_position_embeddings=512"),
        ([[1, 2]], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ([[1, 2]], {"temperature": -0.1}, ValueError, "temperature must be >= 0"),
        ([[1, 2]], {"temperature": float("nan")}, ValueError, "finite"),
        ([[1, 2]], {"top_p": 0.0}, ValueError, "top_p"),
        ([[1, 2]], {"top_p": 1.5}, ValueError, "top_p"),
        ([[1, 2]], {"top_k": -1}, ValueError, "top_k"),
        ([[1, 2]], {"stop_tokens": [300]}, ValueError, "stop_tokens"),
        ([[1, 2]], {"attention": "flash"}, ValueError, "attention"),
    ],
)
def test_bad_inputs_raise(model, prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(model, prompts, **kwargs)


def test_speculative_needs_mtp():
    no_mtp = dsjax.create_model(dsjax.ModelConfig.tiny(num_nextn_predict_layers=0), seed=0)
    with pytest.raises(ValueError, match="MTP"):
        generate(no_mtp, [[1, 2]], speculative=True)


def test_speculative_sampling_matches_plain_sampling_distribution():
    """Over 4096 seeds' worth of rows, the first tokens after a draft are distributed as without speculation.

    A vocabulary of 8 keeps the sampling noise low (total variation between two plain runs: 0.015-0.03); an
    engine that accepted every draft shifts it by 0.08 here.
    """
    cfg = dsjax.ModelConfig.tiny(initializer_range=0.1, vocab_size=8)
    m = dsjax.create_model(cfg, seed=3)
    d = cfg.hidden_size
    m.mtp.eh_proj.set_value(jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))])[None])
    for v in (m.mtp.layer.attn.wo, m.mtp.layer.ffn.w_down, m.mtp.layer.ffn.shared.w_down):
        v.set_value(jnp.zeros_like(v.get_value()))
    prompts = [[5, 7, 3]] * 4096
    kw = dict(max_new_tokens=3, temperature=1.0, stop_tokens=())
    plain = np.asarray(generate(m, prompts, seed=1, **kw))
    spec = generate(m, prompts, seed=3, speculative=True, return_result=True, **kw)
    assert 0.2 < spec.acceptance_rate < 0.95
    for i in (1, 2):
        p, q = (np.bincount(np.asarray(x)[:, i], minlength=8) / len(prompts) for x in (plain, spec.tokens))
        assert 0.5 * np.abs(p - q).sum() < 0.05


def test_one_compilation_per_shape_bucket(model):
    from dsjax.infer import engine

    generate(model, _prompts(lengths=(3, 9)), max_new_tokens=5, stop_tokens=())
    sizes = engine._prefill._cache_size(), engine._decode._cache_size()
    # Other lengths, batch sizes and token budgets in the same buckets reuse the compiled prefill and loop.
    generate(model, _prompts(seed=9, lengths=(5, 12)), max_new_tokens=7, stop_tokens=())
    generate(model, _prompts(seed=9, lengths=(16, 1)), max_new_tokens=16, stop_tokens=())
    assert (engine._prefill._cache_size(), engine._decode._cache_size()) == sizes


@pytest.mark.parametrize(("temperature", "speculative"), [(0.0, False), (1.0, False), (1.0, True)])
def test_recorded_logprobs_are_the_models(drafting_model, temperature, speculative):
    """Each generated token's recorded log-probability is log softmax of the full forward at its position (the
    sampling distribution at temperature 1 without filters; the model's distribution when greedy)."""
    prompts = _prompts(seed=7, lengths=(4, 13))
    result = generate(drafting_model, prompts, max_new_tokens=9, temperature=temperature, stop_tokens=(), seed=2,
                      speculative=speculative, return_result=True)  # fmt: skip
    for prompt, new, logp in zip(prompts, result.tokens, result.logprobs):
        logits = np.asarray(drafting_model(np.asarray([prompt + new], np.int32)))[0, len(prompt) - 1 : -1]
        expected = np.asarray(jax.nn.log_softmax(logits))[np.arange(len(new)), new]
        np.testing.assert_allclose(logp, expected, atol=1e-4)
