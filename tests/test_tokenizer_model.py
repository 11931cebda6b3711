"""The tokenizer against the official ImageFSQVAEModel outputs (tests/golden/tokenizer_small.npz)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import ifsq_jax
from conftest import GOLDEN
from ifsq_jax.convert import tokenizer as conv
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig

SMALL_REF = dict(hidden_size=32, hidden_size_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, embed_dim=4, dropout=0.0,
                 norm_type="groupnorm", encoder_spatial_downsample=["Downsample", "Downsample", ""],
                 decoder_spatial_upsample=["", "Upsample", "Upsample"], levels=[17, 17, 17, 17],
                 do_simple_bound=True, act_fun="scale_sigmoid_16")


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def golden():
  g = np.load(GOLDEN / "tokenizer_small.npz")
  sd = {k[3:]: g[k] for k in g.files if k.startswith("sd/")}
  return g, sd


def test_small_tokenizer_matches_the_reference(golden):
  g, sd = golden
  cfg = conv.config_from_reference(SMALL_REF)
  variables = conv.convert(sd, cfg)
  model = Tokenizer(cfg)
  x = _nhwc(g["x"])
  h_enc = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.encoder(x)))(variables, x)
  np.testing.assert_allclose(np.asarray(h_enc), _nhwc(g["h_enc"]), atol=2e-5)
  latent = model.apply(variables, x, method=Tokenizer.latent)
  np.testing.assert_allclose(np.asarray(latent), _nhwc(g["latent"]), atol=2e-5)
  recon, out = jax.jit(model.apply)(variables, x)
  np.testing.assert_array_equal(np.asarray(out.codes), _nhwc(g["codes"]))
  np.testing.assert_array_equal(np.asarray(out.indices), g["indices"][..., 0])
  np.testing.assert_allclose(np.asarray(recon), _nhwc(g["recon"]), atol=5e-5)
  from_codes = model.apply(variables, _nhwc(g["codes"]), method=Tokenizer.decode)
  np.testing.assert_allclose(np.asarray(from_codes), _nhwc(g["recon"]), atol=5e-5)
  from_idx = model.apply(variables, g["indices"][..., 0], method=Tokenizer.decode_indices)
  np.testing.assert_allclose(np.asarray(from_idx), _nhwc(g["recon"]), atol=5e-5)


def test_paper_configuration_has_the_reference_parameter_count():
  full = json.loads((GOLDEN / "tokenizer_full_keys.json").read_text())
  cfg = conv.config_from_reference(full["config"])
  assert cfg == TokenizerConfig()
  shapes = jax.eval_shape(lambda: Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 256, 256, 3), np.float32)))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  assert count(shapes) == full["num_params"] == 83_324_099
  assert count(shapes["params"]["encoder"]) == 33_850_888
  assert count(shapes["params"]["decoder"]) == 49_473_155
  # The converter maps every parameter entry of the full checkpoint layout.
  sd = {e["key"]: np.zeros(e["shape"], np.float32) for e in full["state_dict"]}
  variables = conv.convert(sd, cfg)
  assert count(variables) == full["num_params"]


def test_convert_cli_and_load_tokenizer_round_trip(golden, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  g, sd = golden
  ckpt = tmp_path / "checkpoint-5000.ckpt"
  torch.save({"ema_state_dict": {f"module.{k}": torch.tensor(v) for k, v in sd.items()},
              "state_dict": {f"module.{k}": torch.zeros_like(torch.tensor(v)) for k, v in sd.items()},
              "step": 5000}, ckpt)
  run_json = tmp_path / "run.json"
  run_json.write_text(json.dumps(SMALL_REF))
  out = tmp_path / "tok"
  proc = subprocess.run([sys.executable, "-m", "ifsq_jax.convert", "tokenizer", "--checkpoint", str(ckpt),
                         "--config", str(run_json), "--out", str(out)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  tok = ifsq_jax.load_tokenizer(str(out))
  x = _nhwc(g["x"])
  np.testing.assert_array_equal(np.asarray(tok.encode(x)), _nhwc(g["codes"]))
  idx = tok.encode_to_indices(x)
  np.testing.assert_array_equal(np.asarray(idx), g["indices"][..., 0])
  np.testing.assert_allclose(np.asarray(tok.decode(tok.encode(x))), _nhwc(g["recon"]), atol=5e-5)
  np.testing.assert_allclose(np.asarray(tok.decode_indices(idx)), _nhwc(g["recon"]), atol=5e-5)


def test_bottleneck_choice_keeps_encoder_and_decoder():
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  base = dict(hidden_size=32, hidden_size_mult=(1, 2), num_res_blocks=1, downsample=(True, False),
              upsample=(False, True), resolution=32)
  sizes = {}
  for b in ("ifsq", "fsq", "vq", "kl", "ae"):
    cfg = TokenizerConfig(**base, bottleneck=b, vq_codebook_size=64)
    v = jax.eval_shape(lambda c=cfg: Tokenizer(c).init({"params": jax.random.key(0), "sample": jax.random.key(1)},
                                                      np.zeros((1, 32, 32, 3), np.float32)))
    sizes[b] = (count(v["params"]["encoder"]), count(v["params"]["decoder"]))
  assert len(set(sizes.values())) == 1
  with pytest.raises(ValueError, match="bottleneck='lfq'"):
    TokenizerConfig(bottleneck="lfq")


def _init_shapes(cfg, size=32):
  return jax.eval_shape(lambda: Tokenizer(cfg).init({"params": jax.random.key(0), "sample": jax.random.key(1)},
                                                    np.zeros((1, size, size, 3), np.float32)))


ATTN = dict(hidden_size=32, hidden_size_mult=(1, 2), num_res_blocks=1, downsample=(True, False),
            upsample=(False, True), resolution=32, attn_resolutions=(16,))


@pytest.mark.parametrize("bottleneck", ["ifsq", "fsq", "kl", "ae", "vq"])
def test_every_parameter_has_logical_axis_names_and_unboxes_to_the_plain_layout(bottleneck):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  boxed = _init_shapes(TokenizerConfig(**ATTN, bottleneck=bottleneck, vq_codebook_size=64))
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  unnamed = [jax.tree_util.keystr(p) for p, x in leaves if not isinstance(x, nn.LogicallyPartitioned)]
  assert not unnamed
  assert all(len(x.names) == len(x.value.shape) for _, x in leaves)
  names = {jax.tree_util.keystr(p): x.names for p, x in leaves}
  assert names["['params']['encoder']['down_1']['attn_0']['q']['kernel']"] == ("embed", "mlp")
  assert names["['params']['quant_conv']['kernel']"] == ("kernel_h", "kernel_w", "conv_in", "conv_out")
  assert names["['params']['decoder']['norm_out']['scale']"] == ("norm",)
  plain = nn.meta.unbox(boxed)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), plain) == jax.tree.map(
      lambda x: (x.value.shape, x.value.dtype), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def test_init_follows_pytorch_defaults_layer_by_layer():
  """Conv and linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch's layers; GroupNorm 1 and 0."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cfg = TokenizerConfig(**ATTN)
  params = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))["params"]
  layers = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [p.key for p in path]
    if keys[-1] != "kernel":
      if keys[-2].startswith("norm"):
        np.testing.assert_array_equal(leaf, 1.0 if keys[-1] == "scale" else 0.0)
      continue
    layer = params
    for k in keys[:-1]:
      layer = layer[k]
    kernel, bias = np.asarray(leaf), np.asarray(layer["bias"])
    if kernel.ndim == 4:
      kh, kw, cin, cout = kernel.shape
      ref = torch.nn.Conv2d(cin, cout, (kh, kw))
    else:
      cin, cout = kernel.shape
      kh = kw = 1
      ref = torch.nn.Linear(cin, cout)
    bound = 1 / np.sqrt(kh * kw * cin)
    for ours, theirs in ((kernel, ref.weight.detach().numpy()), (bias, ref.bias.detach().numpy())):
      assert ours.size == theirs.size
      assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
      if ours.size >= 100:  # the same support, reached alike
        assert np.abs(ours).max() > 0.9 * bound and np.abs(theirs).max() > 0.9 * bound
      if ours.size >= 4000:  # the same spread: std b / sqrt(3), ours within a few percent of torch's
        np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.05)
        np.testing.assert_allclose(ours.std(), bound / np.sqrt(3), rtol=0.05)
    layers += 1
  # Every conv and linear layer was checked: encoder 14 (conv_in, 2 + 1 + 3 convs, 4 attention, mid 2, conv_out),
  # quant_conv and post_quant_conv, decoder 22 (conv_in, mid 2, 4 + 8 + 1 at 16x16, 5 at 32x32, conv_out).
  assert layers == 14 + 2 + 22


def test_config_validates_and_normalises_its_fields():
  assert TokenizerConfig(group_sizes=()).group_sizes is None  # configs store "no groups" as ()
  assert TokenizerConfig(group_sizes=(2, 2)).group_sizes == (2, 2)
  assert TokenizerConfig(group_sizes=()) == TokenizerConfig()
  with pytest.raises(ValueError, match=r"levels=\(17, 1, 17, 17\) is not valid; give one integer >= 2"):
    TokenizerConfig(levels=(17, 1, 17, 17))
  with pytest.raises(ValueError, match=r"levels=\(\) is not valid"):
    TokenizerConfig(levels=(), bottleneck="ae")
  with pytest.raises(ValueError, match=r"bottleneck='lfq' is not valid; use one of \('ifsq', 'fsq', 'vq', 'kl', 'ae'\)"):
    TokenizerConfig(bottleneck="lfq")
  with pytest.raises(ValueError, match=r"conv_impl='cuda' is not valid; use one of \('auto', 'xla', 'onednn'\)"):
    TokenizerConfig(conv_impl="cuda")
