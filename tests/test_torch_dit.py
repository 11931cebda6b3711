"""bench/torch_dit.py, the PyTorch side of bench/dit_bench.py, is the official DiT."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import GOLDEN, REPO

sys.path.insert(0, str(REPO / "bench"))
import torch_dit  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# The tiny golden model (tests/golden/README.md of the fixtures, section 4).
SMALL = dict(input_size=8, patch_size=1, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10,
             use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, learn_sigma=False, z_dims=[32],
             encoder_depth=2, projector_dim=64)


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(GOLDEN / "dit_small.npz"))


@pytest.fixture(scope="module")
def small(golden):
  model = torch_dit.TorchDiT(**SMALL).eval()
  model.load_state_dict({k[3:]: torch.tensor(v) for k, v in golden.items() if k.startswith("sd/")}, strict=True)
  return model


def _t(a):
  return torch.tensor(a)


def test_matches_the_official_forward(golden, small):
  captured = []
  hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o.numpy())) for b in small.blocks]
  try:
    with torch.no_grad():
      c = small.t_embedder(_t(golden["t"])) + small.y_embedder(_t(golden["y"]), False)
      out, zs = small(_t(golden["x"]), _t(golden["t"]), _t(golden["y"]))
  finally:
    for h in hooks:
      h.remove()
  np.testing.assert_allclose(c.numpy(), golden["c"], atol=1e-5)
  np.testing.assert_allclose(out.numpy(), golden["out"], atol=2e-5)
  assert len(zs) == 1
  np.testing.assert_allclose(zs[0].numpy(), golden["zs0"], atol=2e-5)
  for i, block_out in enumerate(captured):
    np.testing.assert_allclose(block_out, golden[f"block_out/{i}"], atol=5e-5)
  assert len(captured) == 3


def test_classifier_free_guidance_keeps_the_reference_three_channel_quirk(golden, small):
  x, t, y = _t(golden["cfg/x"]), _t(golden["cfg/t"]), _t(golden["cfg/y"])
  with torch.no_grad():
    raw = small(torch.cat([x[:2], x[:2]]), t, y)[0]
    out = small.forward_with_cfg(x, t, y, 4.0)
    cond_only = small.forward_with_cfg(x, t, y, 4.0, cfg_interval=True, cfg_interval_start=0.5)
  np.testing.assert_allclose(raw.numpy(), golden["cfg/model_out"], atol=2e-5)
  np.testing.assert_allclose(out.numpy(), golden["cfg/out"], atol=5e-5)
  # Channel 3 is left unguided: the halves differ there, and agree on the guided channels.
  assert (out[:2, 3] - out[2:, 3]).abs().max() > 1e-3
  np.testing.assert_array_equal(out[:2, :3].numpy(), out[2:, :3].numpy())
  # t = 0.37 < 0.5 inside the interval: the conditional prediction replaces the guided one.
  np.testing.assert_allclose(cond_only[:2, :3].numpy(), raw[:2, :3].numpy(), atol=1e-6)


def test_fixed_tables_match_the_stored_buffers(golden):
  model = torch_dit.TorchDiT(**SMALL)
  np.testing.assert_allclose(model.pos_embed.detach().numpy(), golden["sd/pos_embed"], atol=1e-7)
  np.testing.assert_allclose(model.feat_rope.freqs_cos.numpy(), golden["sd/feat_rope.freqs_cos"], atol=1e-6)
  np.testing.assert_allclose(model.feat_rope.freqs_sin.numpy(), golden["sd/feat_rope.freqs_sin"], atol=1e-6)
  assert not model.pos_embed.requires_grad


def test_fresh_model_is_adaln_zero():
  """Zero-initialised adaLN and output layers: a fresh model predicts exactly zero velocity."""
  torch.manual_seed(0)
  model = torch_dit.TorchDiT(**SMALL).train()
  out, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10]))
  assert out.shape == (2, 4, 8, 8) and zs[0].shape == (2, 64, 32)
  assert not out.detach().any()
  assert zs[0].detach().abs().max() > 0


def test_dit_l1_has_the_reference_parameters_and_state_dict():
  full = json.loads((GOLDEN / "dit_full_keys.json").read_text())
  with torch.device("meta"):
    model = torch_dit.TorchDiT(**torch_dit.dit_kwargs("L", 1))
  assert {k: v for k, v in full["kwargs"].items() if k != "use_checkpoint"}.items() <= \
      torch_dit.dit_kwargs("L", 1).items()
  assert sum(p.numel() for p in model.parameters()) == full["num_params"] == 465_967_844
  assert sum(p.numel() for p in model.parameters() if p.requires_grad) == full["num_trainable_params"]
  assert {k: list(v.shape) for k, v in model.state_dict().items()} == \
      {e["key"]: e["shape"] for e in full["state_dict"]}


def test_presets_and_refusals():
  kwargs = torch_dit.dit_kwargs("S", 2, z_dims=[])
  assert (kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"], kwargs["patch_size"]) == (12, 384, 6, 2)
  with pytest.raises(ValueError, match="size='M'"):
    torch_dit.dit_kwargs("M")
  with pytest.raises(ValueError, match="unknown TorchDiT arguments \\['depht'\\]"):
    torch_dit.dit_kwargs("S", depht=3)
  with pytest.raises(ValueError, match="learn_sigma=True"):
    torch_dit.TorchDiT(**dict(SMALL, learn_sigma=True))
  with pytest.raises(ValueError, match="encoder_depth=4"):
    torch_dit.TorchDiT(**dict(SMALL, encoder_depth=4))


def test_patch_two_round_trips_through_unpatchify():
  """A patch-2 model's output layout: the final linear's features land on the right pixels."""
  model = torch_dit.TorchDiT(**dict(SMALL, patch_size=2, z_dims=[]))
  tokens = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 16, 16)  # (B, N, p * p * C)
  img = model.unpatchify(tokens)  # (B, C, H, W)
  # Token n = 4 * i + j covers pixels (2i + a, 2j + b); its features are ordered (a, b, C).
  for n, (a, b, ch) in [(0, (0, 0, 0)), (5, (1, 0, 3)), (15, (1, 1, 2))]:
    i, j = divmod(n, 4)
    feature = (a * 2 + b) * 4 + ch
    assert img[1, ch, 2 * i + a, 2 * j + b] == tokens[1, n, feature]


def test_original_dit_options_change_the_state_dict_as_the_reference():
  model = torch_dit.TorchDiT(**dict(SMALL, use_swiglu=False, use_rmsnorm=False, use_rope=False, use_qknorm=False))
  keys = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("blocks.0.")}
  assert keys == {"blocks.0.attn.qkv.weight": (192, 64), "blocks.0.attn.qkv.bias": (192,),
                  "blocks.0.attn.proj.weight": (64, 64), "blocks.0.attn.proj.bias": (64,),
                  "blocks.0.mlp.fc1.weight": (256, 64), "blocks.0.mlp.fc1.bias": (256,),
                  "blocks.0.mlp.fc2.weight": (64, 256), "blocks.0.mlp.fc2.bias": (64,),
                  "blocks.0.adaLN_modulation.1.weight": (384, 64), "blocks.0.adaLN_modulation.1.bias": (384,)}
  assert not any(k.startswith("feat_rope") or k.startswith("final_layer.norm") for k in model.state_dict())
  out, _ = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3]))
  assert out.shape == (2, 4, 8, 8)


def test_bench_builds_the_same_model_in_both_frameworks_and_counts_its_flops():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import dit_bench  # pylint: disable=g-import-not-at-top
  from ifsq_jax.models import dit  # pylint: disable=g-import-not-at-top

  x, t, y = jnp.zeros((2, 16, 16, 4)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)
  for cfg in (dit.dit_config("S", 2, input_size=16, z_dim=0), dit.dit_config("L", 1)):
    params = jax.eval_shape(dit.DiT(**cfg).init, jax.random.key(0), x, t, y)["params"]
    with torch.device("meta"):
      model = torch_dit.TorchDiT(**dit_bench.torch_kwargs(cfg))
    assert sum(p.numel() for p in model.parameters()) == dit.num_params(params)
  # The analytic count is XLA's count of the matmuls; XLA adds the elementwise work (about 1% here).
  cfg = dit.dit_config("S", 2, input_size=8, depth=2, z_dim=0, scan_layers=False)
  module = dit.DiT(**cfg)
  params = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x[:, :8, :8], t, y)["params"])
  cost = jax.jit(lambda p: module.apply({"params": p}, x[:, :8, :8], t, y)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 1.0 < cost["flops"] / (2 * dit_bench.forward_flops(cfg)) < 1.03
