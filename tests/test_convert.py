"""HF <-> orbax conversion: bit-exact round trips (routing bias included), sharded restore, clear errors."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.checkpoint.orbax_io import load_orbax, save_orbax
from dsjax.checkpoint.safetensors_io import CheckpointError, CheckpointReader
from dsjax.sharding import make_mesh, state_shardings

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert.py"
_spec = importlib.util.spec_from_file_location("convert_script", _SCRIPT)
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)


def with_bias(model):
    """Give every routing bias distinct non-zero values, so a test fails if the bias is not saved."""
    for ffn in (model.moe_layers.ffn, model.mtp.layer.ffn):
        bias = ffn.routing_bias.get_value()
        values = jnp.arange(1, bias.size + 1, dtype=jnp.float32).reshape(bias.shape) / 7
        ffn.routing_bias.set_value(jax.device_put(values, bias.sharding))
    return model


@pytest.fixture(scope="module")
def model():
    return with_bias(dsjax.create_model(dsjax.ModelConfig.tiny(), seed=0))


def leaves(model) -> dict:
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype and a[path].shape == b[path].shape, path
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_hf_orbax_hf_round_trip_is_bit_exact(model, tmp_path, capsys):
    hf, orbax_dir, hf2 = tmp_path / "hf", tmp_path / "orbax", tmp_path / "hf2"
    dsjax.save_pretrained(model, str(hf))
    assert convert.main(["hf-to-orbax", str(hf), str(orbax_dir)]) == 0
    assert convert.main(["orbax-to-hf", str(orbax_dir), str(hf2), "--max-shard-gb", "0.0002"]) == 0
    out = capsys.readouterr().out
    assert f"{dsjax.count_params(model, include_mtp=True):,} parameters" in out

    ref = leaves(model)
    assert np.any(ref[("moe_layers", "ffn", "routing_bias")] != 0)
    assert_same(ref, leaves(load_orbax(orbax_dir)))
    assert_same(ref, leaves(dsjax.from_pretrained(str(hf2), dtype=jnp.float32)))

    before, after = CheckpointReader(hf), CheckpointReader(hf2)
    assert len(list(hf2.glob("*.safetensors"))) > 1  # the shard size limit was honoured
    assert before.keys() == after.keys()
    for name in before.keys():
        x, y = before.get(name), after.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_bfloat16_conversion_keeps_router_fp32(model, tmp_path):
    save_orbax(model, tmp_path / "orbax")
    convert.main(["orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--dtype", "bfloat16"])
    reader = CheckpointReader(tmp_path / "hf")
    assert reader.get("model.embed_tokens.weight").dtype == jnp.bfloat16
    bias = reader.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == np.float32
    np.testing.assert_array_equal(bias, np.asarray(model.moe_layers.ffn.routing_bias.get_value()[0]))


def test_sharded_save_and_restore(model, tmp_path):
    mesh = make_mesh(data=2, expert=4)
    graphdef, state = nnx.split(model)
    # device_put compiles nothing, unlike create_model(mesh=...), which keeps this test fast.
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    save_orbax(sharded, tmp_path)
    restored = load_orbax(tmp_path, mesh=mesh)

    flat = nnx.to_flat_state(nnx.state(restored))
    expected = dict(nnx.to_flat_state(state_shardings(nnx.state(restored), mesh)))
    assert any(v.get_value().sharding.spec != jax.sharding.PartitionSpec() for _, v in flat)  # experts split
    for path, var in flat:
        sharding = var.get_value().sharding
        assert sharding.mesh == mesh and sharding.spec == expected[path].get_value().spec, path
    assert_same(leaves(sharded), leaves(restored))

    # Without a mesh the same checkpoint restores onto one device.
    single = load_orbax(tmp_path)
    for _, var in nnx.to_flat_state(nnx.state(single)):
        assert var.get_value().sharding.device_set == {jax.devices()[0]}
    assert_same(leaves(sharded), leaves(single))


def test_mismatched_or_missing_checkpoints_raise(model, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_orbax(tmp_path / "nowhere")
    assert convert.main(["orbax-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 1
    assert "does not exist" in capsys.readouterr().err

    save_orbax(model, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    original = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**original, "hidden_size": 96}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: .*embed \(256, 64\) \(expected \(256, 96\)\)"):
        load_orbax(tmp_path / "ckpt")

    config_path.write_text(json.dumps({**original, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match="unexpected arrays: mtp/"):
        load_orbax(tmp_path / "ckpt")

    config_path.unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_orbax(tmp_path / "ckpt")
