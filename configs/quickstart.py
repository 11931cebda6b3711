r"""Quickstart: a small iFSQ tokenizer on the embedded images, on CPU in minutes.

  python -m ifsq_jax.main --config=configs/quickstart.py --workdir=out/quickstart

The work dir then holds reconstructions (images/), metrics (metrics.jsonl and
eval.json: PSNR, SSIM, LPIPS, fd_vgg16, code usage), TensorBoard logs and a
checkpoint that ``ifsq_jax.load_tokenizer(workdir)`` opens.
"""

from ifsq_jax.train import tokenizer


def get_config(arg=None):
  c = tokenizer.default_config()
  c.seed = 0
  c.data.image_size = 32
  c.data.eval_examples = 64
  c.train.global_batch_size = 16
  c.train.num_steps = 600
  c.train.log_every = 50
  c.train.eval_every = 300
  c.train.image_every = 300
  c.train.ema_decay = 0.99
  c.checkpoint.every = 300
  c.optimizer.lr = 1e-3
  c.model.hidden_size = 32
  c.model.hidden_size_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.downsample = (True, True, False)
  c.model.upsample = (False, True, True)
  c.model.levels = (17, 17, 17, 17)
  c.loss.disc_start = 400
  c.loss.disc_ndf = 16
  c.loss.disc_layers = 2
  if arg:
    raise ValueError(f"configs/quickstart.py has no variant {arg!r}.")
  return c
