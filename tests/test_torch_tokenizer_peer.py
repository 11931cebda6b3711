"""bench/torch_tokenizer.py, the PyTorch side of bench/tokenizer_bench.py, is the official tokenizer."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import GOLDEN, REPO
from ifsq_jax import FSQ
from test_tokenizer_model import SMALL_REF

sys.path.insert(0, str(REPO / "bench"))
import torch_tokenizer  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

SMALL_CFG = dict(hidden_size=32, hidden_size_mult=(1, 2, 2), num_res_blocks=1, downsample=(True, True, False),
                 upsample=(False, True, True))


def test_matches_the_official_model_outputs():
  g = np.load(GOLDEN / "tokenizer_small.npz")
  model = torch_tokenizer.ImageFSQVAE(SMALL_REF)
  sd = {k[3:]: torch.tensor(g[k]) for k in g.files if k.startswith("sd/")}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not missing and all(k.startswith("quantize.running_") for k in unexpected), (missing, unexpected)
  with torch.no_grad():
    x = torch.tensor(g["x"])
    h = model.encoder(x)
    np.testing.assert_allclose(h.numpy(), g["h_enc"], atol=2e-5)
    np.testing.assert_allclose(model.quant_conv(h).numpy(), g["latent"], atol=2e-5)
    recon, codes, indices = model(x)
  np.testing.assert_array_equal(codes.numpy(), g["codes"])
  np.testing.assert_array_equal(indices.numpy(), g["indices"][..., 0])
  np.testing.assert_allclose(recon.numpy(), g["recon"], atol=5e-5)


def test_paper_configuration_has_the_reference_parameter_count():
  full = json.loads((GOLDEN / "tokenizer_full_keys.json").read_text())
  with torch.device("meta"):
    model = torch_tokenizer.ImageFSQVAE(full["config"])
  assert sum(p.numel() for p in model.parameters()) == full["num_params"] == 83_324_099
  params = {e["key"]: e["shape"] for e in full["state_dict"] if e["kind"] == "param"}
  assert {k: list(v.shape) for k, v in model.state_dict().items()} == params


def test_tanh_bound_matches_ifsq_jax():
  model = torch_tokenizer.ImageFSQVAE(dict(SMALL_REF, do_simple_bound=False, levels=[8, 5, 5, 4]))
  z = np.random.default_rng(0).normal(0, 2, (2, 4, 6, 6)).astype(np.float32)
  codes, indices = model.quantize(torch.tensor(z))
  fsq = FSQ(levels=(8, 5, 5, 4), bound="tanh")
  want = fsq.quantize(np.moveaxis(z, 1, -1))
  np.testing.assert_allclose(codes.numpy(), np.moveaxis(np.asarray(want), -1, 1), atol=1e-6)
  np.testing.assert_array_equal(indices.numpy(), np.asarray(fsq.codes_to_indices(want)))


def test_refuses_what_it_does_not_build():
  with pytest.raises(ValueError, match="attn_resolutions=\\[16\\]"):
    torch_tokenizer.ImageFSQVAE(dict(SMALL_REF, attn_resolutions=[16]))
  with pytest.raises(ValueError, match="act_fun='tanh'"):
    torch_tokenizer.ImageFSQVAE(dict(SMALL_REF, act_fun="tanh"))


def test_bench_builds_the_same_model_in_both_frameworks():
  import tokenizer_bench  # pylint: disable=g-import-not-at-top
  from ifsq_jax.convert import tokenizer as conv  # pylint: disable=g-import-not-at-top
  from ifsq_jax.models.tokenizer import TokenizerConfig  # pylint: disable=g-import-not-at-top
  for cfg in (TokenizerConfig(resolution=128), TokenizerConfig(**{**SMALL_CFG, "resolution": 32})):
    ref = tokenizer_bench.reference_config(cfg)
    assert conv.config_from_reference(dict(ref, resolution=cfg.resolution)) == cfg
  with torch.device("meta"):
    model = torch_tokenizer.ImageFSQVAE(tokenizer_bench.reference_config(TokenizerConfig()))
  assert sum(p.numel() for p in model.parameters()) == 83_324_099
