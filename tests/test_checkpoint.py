"""HF-format checkpoint I/O: lossless round trips, sharded streaming loads, and clear errors on bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import dsjax
from dsjax.checkpoint.safetensors_io import CheckpointReader, SafetensorsFile, write_safetensors
from dsjax.sharding import make_mesh

CFG = dsjax.ModelConfig.tiny(initializer_range=0.1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = dsjax.create_model(CFG, seed=2)
    bias = model.moe_layers.ffn.routing_bias
    bias.set_value(jax.random.normal(jax.random.key(0), bias.get_value().shape))
    path = tmp_path_factory.mktemp("ckpt")
    dsjax.save_pretrained(model, path, max_shard_bytes=100_000)
    return model, path


def _leaves(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_round_trip_is_lossless(saved, tmp_path):
    model, path = saved
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    assert os.path.exists(path / "model.safetensors.index.json")
    loaded = dsjax.from_pretrained(path, dtype=jnp.float32)
    a, b = _leaves(model), _leaves(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    dsjax.save_pretrained(loaded, tmp_path, max_shard_bytes=100_000)  # load -> save -> load again
    for k, v in _leaves(dsjax.from_pretrained(tmp_path, dtype=jnp.float32)).items():
        np.testing.assert_array_equal(a[k], v, err_msg=str(k))


def test_bf16_save_and_dtype_policy(saved, tmp_path):
    model, _ = saved
    dsjax.save_pretrained(model, tmp_path, dtype=jnp.bfloat16)
    reader = CheckpointReader(tmp_path)
    assert reader.get("model.embed_tokens.weight").dtype == jnp.bfloat16
    assert reader.get("model.layers.1.mlp.gate.weight").dtype == np.float32  # router stays fp32
    assert reader.get("model.layers.1.mlp.gate.e_score_correction_bias").dtype == np.float32
    loaded = dsjax.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert loaded.embed.get_value().dtype == jnp.bfloat16
    assert loaded.moe_layers.ffn.router.get_value().dtype == jnp.float32
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_our_safetensors_match_the_library(tmp_path):
    """Files written by dsjax read back identically with the safetensors package, and vice versa."""
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64)}
    write_safetensors(tmp_path / "x.safetensors", arrays)
    for k, v in load_file(tmp_path / "x.safetensors").items():
        np.testing.assert_array_equal(v.numpy(), arrays[k])
    ref = {"bf": torch.randn(4, 3).bfloat16(), "f8": torch.randn(2, 5).to(torch.float8_e4m3fn)}
    save_file(ref, tmp_path / "y.safetensors")
    ours = SafetensorsFile(tmp_path / "y.safetensors")
    np.testing.assert_array_equal(ours.get("bf").astype(np.float32), ref["bf"].float().numpy())
    np.testing.assert_array_equal(ours.get("f8").astype(np.float32), ref["f8"].float().numpy())


def test_streaming_load_onto_mesh(saved):
    """Each weight lands directly in its sharded layout on a data x expert mesh."""
    model, path = saved
    mesh = make_mesh(data=2, expert=4)
    loaded = dsjax.from_pretrained(path, dtype=jnp.float32, mesh=mesh)
    experts = loaded.moe_layers.ffn.w_gate.get_value()
    assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, None)
    assert experts.addressable_shards[0].data.shape == (2, CFG.n_routed_experts // 4, 64, 32)
    for k, v in _leaves(loaded).items():
        np.testing.assert_array_equal(_leaves(model)[k], v, err_msg=str(k))


def _copy_without(src, dst, drop=(), add=None, reshape=None):
    reader = CheckpointReader(src)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys() if k not in drop}
    tensors.update(add or {})
    for k, shape in (reshape or {}).items():
        tensors[k] = np.zeros(shape, tensors[k].dtype)
    os.makedirs(dst, exist_ok=True)
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_listed(saved, tmp_path):
    _, path = saved
    bad = _copy_without(
        path,
        tmp_path / "a",
        drop={"model.layers.1.mlp.experts.3.up_proj.weight"},
        add={"model.layers.1.mlp.extra.weight": np.zeros(2, np.float32)},
    )
    with pytest.raises(
        dsjax.CheckpointError,
        match=r"missing tensors: model\.layers\.1\.mlp\.experts\.3\.up_proj"
        r".*unexpected tensors: model\.layers\.1\.mlp\.extra\.weight",
    ):
        dsjax.from_pretrained(bad)
    bad = _copy_without(path, tmp_path / "b", reshape={"model.layers.0.self_attn.kv_b_proj.weight": (3, 3)})
    with pytest.raises(dsjax.CheckpointError, match=r"wrong shapes.*kv_b_proj.weight \(3, 3\)"):
        dsjax.from_pretrained(bad)
    bad = _copy_without(path, tmp_path / "c", add={"model.layers.3.embed_tokens.weight": np.ones((256, 64), "f4")})
    with pytest.raises(dsjax.CheckpointError, match="differs from model.embed_tokens"):
        dsjax.from_pretrained(bad)


def test_corrupt_files_and_pickles_are_rejected(saved, tmp_path):
    _, path = saved
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    data = (path / shard).read_bytes()
    broken = tmp_path / "truncated"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(dsjax.CheckpointError, match="past the end of the file|truncated"):
        dsjax.from_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(dsjax.CheckpointError, match="corrupt header|not a readable"):
        dsjax.from_pretrained(broken)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((path / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(dsjax.CheckpointError, match="pickle checkpoints are not loaded"):
        dsjax.from_pretrained(pickled)
    with pytest.raises(dsjax.CheckpointError, match="does not exist"):
        dsjax.from_pretrained(tmp_path / "nowhere")
