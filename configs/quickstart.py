r"""Quickstart: a small iFSQ tokenizer on the embedded images, on CPU in minutes.

  python -m ifsq_jax.main --config=configs/quickstart.py --workdir=out/quickstart

The work dir then holds reconstructions (images/), metrics (metrics.jsonl and
eval.json: PSNR, SSIM, LPIPS, fd_vgg16, code usage), TensorBoard logs and a
checkpoint that ``ifsq_jax.load_tokenizer(workdir)`` opens.

To run in a few minutes on 2 CPU cores, it trains the reconstruction (L1) term
only: LPIPS-VGG would make each step about 2.7 times slower, and a GAN phase
this short lowers PSNR. The paper's full objective (L1 + LPIPS + PatchGAN) at
the same size is ``configs/ifsq_f16_d4.py:tiny``.
"""

from ifsq_jax import config_lib
from ifsq_jax.train import tokenizer


def get_config(arg=None):
  config_lib.parse_variant(arg)  # no variants
  c = tokenizer.small_cpu_config(tokenizer.default_config())
  c.seed = 0
  c.train.num_steps = 400
  c.train.eval_every = c.train.image_every = c.checkpoint.every = 400
  c.train.ema_decay = 0.9
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 20
  c.loss.perceptual_weight = 0.0  # L1 only (see above)
  c.loss.disc_start = c.train.num_steps  # no GAN steps
  return c
