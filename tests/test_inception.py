"""FID Inception-v3 against a torch.nn rebuild of pytorch-fid's architecture (see torch_fid_inception.py)."""

import subprocess
import sys

import jax
import numpy as np
import torch

from ifsq_jax.convert import inception as conv
from torch_fid_inception import FIDInceptionV3


def _reference(seed=0):
  torch.manual_seed(seed)
  model = FIDInceptionV3().eval()
  with torch.no_grad():  # BatchNorm statistics away from their init so that they matter
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.normal_(1, 0.1)
        m.bias.normal_(0, 0.1)
  return model


def test_fid_inception_features_match_the_pytorch_architecture(tmp_path):
  model = _reference()
  x = torch.rand(2, 3, 64, 80)
  with torch.no_grad():
    ref = model(x).numpy()
  path = tmp_path / "pt_inception.pth"
  torch.save(model.state_dict(), path)
  out = tmp_path / "inception"
  proc = subprocess.run([sys.executable, "-m", "ifsq_jax.convert", "inception", "--checkpoint", str(path),
                         "--out", str(out)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  module, variables = conv.load(str(out))
  ours = np.asarray(jax.jit(module.apply)(variables, x.numpy().transpose(0, 2, 3, 1)))
  assert ours.shape == (2, 2048) and np.abs(ref).max() > 0.1
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_missing_weights_say_which_file_and_where():
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth from the pytorch-fid"):
    conv.load("/nonexistent/inception")
