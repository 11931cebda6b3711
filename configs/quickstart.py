r"""Quickstart: a small iFSQ tokenizer on the embedded images, on CPU in minutes.

  python -m ifsq_jax.main --config=configs/quickstart.py --workdir=out/quickstart

The work dir then holds reconstructions (images/), metrics (metrics.jsonl and
eval.json: PSNR, SSIM, LPIPS, fd_vgg16, code usage), TensorBoard logs and a
checkpoint that ``ifsq_jax.load_tokenizer(workdir)`` opens.
"""

from ifsq_jax import config_lib
from ifsq_jax.train import tokenizer


def get_config(arg=None):
  config_lib.parse_variant(arg)  # no variants
  c = tokenizer.small_cpu_config(tokenizer.default_config())
  c.seed = 0
  return c
