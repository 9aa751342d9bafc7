"""The same model on one device and on an 8-device data x expert mesh gives the same logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import dsjax
from dsjax.sharding import (
    DEFAULT_RULES,
    FSDP_RULES,
    batch_row_axes,
    free_axes,
    gathered_spec,
    logical_to_spec,
    make_mesh,
    state_shardings,
    use_mesh,
    weight_spec,
)


def test_rules_map_logical_axes_first_dimension_wins_and_uneven_axes_drop():
    mesh = make_mesh(data=2, expert=4)
    assert logical_to_spec(("batch", "seq", "act_embed"), DEFAULT_RULES, mesh) == P(("data", "expert"), None, None)
    # `expert` is taken by the experts, so the FSDP width axis gets `data` alone.
    assert logical_to_spec(("experts", "embed", "moe_mlp"), FSDP_RULES, mesh) == P("expert", "data", None)
    assert logical_to_spec(("embed", "vocab"), FSDP_RULES, mesh) == P(("data", "expert"), None)
    assert logical_to_spec(("experts", "batch"), DEFAULT_RULES, mesh) == P("expert", "data")
    # 12 rows split over data (2) but not over data x expert (8); 3 over neither.
    assert logical_to_spec(("embed", "vocab"), FSDP_RULES, mesh, shape=(12, 5)) == P("data", None)
    assert logical_to_spec(("embed",), FSDP_RULES, mesh, shape=(3,)) == P(None)
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), FSDP_RULES, mesh, shape=(3, 4))
    assert logical_to_spec(("layers", "experts", "embed", "moe_mlp"), DEFAULT_RULES, mesh) == P(
        None, "expert", None, None
    )
    single = make_mesh(data=8, expert=1, devices=jax.devices())
    assert logical_to_spec(("batch",), DEFAULT_RULES, single) == P(("data", "expert"))


def test_use_mesh_declares_the_weights_rules_while_it_lasts():
    """``weight_spec``: the layout a weight has under the rules ``use_mesh`` declared (shape-aware, like the
    placement), None when none were declared or there is no mesh; the declaration ends with the block."""
    mesh = make_mesh(data=2, expert=4)
    axes, shape = ("experts", "embed", "moe_mlp"), (8, 256, 64)
    assert weight_spec(axes, shape) is None
    with jax.set_mesh(mesh):
        assert weight_spec(axes, shape) is None
    with use_mesh(mesh, FSDP_RULES):
        assert jax.sharding.get_abstract_mesh().shape == mesh.shape
        assert weight_spec(axes, shape) == P("expert", "data", None)
        assert weight_spec(axes, (8, 255, 64)) == P("expert", None, None)  # 255 does not split over data
        with use_mesh(mesh, DEFAULT_RULES):
            assert weight_spec(axes, shape) == P("expert", None, None)
        assert weight_spec(axes, shape) == P("expert", "data", None)
    assert weight_spec(axes, shape) is None and jax.sharding.get_abstract_mesh().empty
    # gathered for use: the token axes FSDP split a weight over go, tensor-parallel ones stay
    with jax.set_mesh(make_mesh(data=2, expert=2, model=2)):
        assert gathered_spec(P(("data", "expert"), "model")) == P(None, "model")
        assert gathered_spec(P("expert", "data", None)) == P(None, None, None)
        assert gathered_spec(P(("model", "data"))) == P("model")


@pytest.mark.parametrize("dispatch", ["ragged", "blocked", "ep"])
def test_sharded_equals_single_device(dispatch):
    cfg = dsjax.ModelConfig.tiny(initializer_range=0.1)
    model = dsjax.create_model(cfg, seed=4)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12)), jnp.int32)
    ref_logits, ref_mtp = model(tokens, return_mtp=True, dispatch="ragged")

    mesh = make_mesh(data=2, expert=4)
    graphdef, state = nnx.split(model)
    sharded_state = jax.device_put(state, state_shardings(state, mesh))
    assert sharded_state["moe_layers"]["ffn"]["w_up"].get_value().sharding.spec == P(None, "expert", None, None)
    with jax.set_mesh(mesh):
        sharded = nnx.merge(graphdef, sharded_state)
        logits, mtp = sharded(
            jax.device_put(tokens, jax.NamedSharding(mesh, P(("data", "expert")))), return_mtp=True, dispatch=dispatch
        )
    assert logits.sharding.spec[0] == ("data", "expert")
    chex.assert_trees_all_close((logits, mtp), (ref_logits, ref_mtp), atol=1e-5, rtol=1e-5)


def test_create_model_on_mesh_matches_unsharded():
    cfg = dsjax.ModelConfig.tiny()
    mesh = make_mesh(data=2, expert=4)
    sharded = dsjax.create_model(cfg, seed=7, mesh=mesh)
    plain = dsjax.create_model(cfg, seed=7)
    assert sharded.moe_layers.ffn.w_down.get_value().sharding.spec == P(None, "expert", None, None)
    chex.assert_trees_all_equal(jax.device_get(nnx.state(sharded)), jax.device_get(nnx.state(plain)))


def test_batch_row_axes_split_rows_like_the_batch_over_free_axes():
    """How per-shard kernels (splash, the FP8 Pallas GEMMs) split rows: the batch rule's axes in order, each
    kept while the rows still divide (into whole ``tile``-row shards), none without a mesh or inside a
    ``shard_map`` that made them manual."""
    assert free_axes() == () and batch_row_axes(16) == ()
    mesh = make_mesh(2, 4)
    with jax.set_mesh(mesh):
        assert free_axes() == ("data", "expert")
        assert batch_row_axes(16) == ("data", "expert")
        assert batch_row_axes(6) == ("data",)  # 6 rows do not split 8 ways: the expert axis stays replicated
        assert batch_row_axes(3) == ()
        assert batch_row_axes(2048, tile=128) == ("data", "expert")
        assert batch_row_axes(512, tile=128) == ("data",)  # 64-row shards would straddle 128-row tiles

        def inner(x):
            assert free_axes() == ("expert",) and batch_row_axes(16) == ("expert",)
            return x

        jax.shard_map(inner, in_specs=P("data"), out_specs=P("data"), axis_names={"data"})(jnp.zeros(8))
