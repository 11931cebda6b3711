r"""A tiny FSQ autoencoder on the embedded images: the smallest run of the shared loop.

  python -m ifsq_jax.main --config=configs/toy.py --workdir=out/toy
  python -m ifsq_jax.main --config=configs/toy.py:long --workdir=out/toy --config.optimizer.lr=1e-3
"""

from ifsq_jax import config_lib
from ifsq_jax.train import toy


def get_config(arg=None):
  v = config_lib.parse_variant(arg, long=False)
  config = toy.default_config()
  if v.long:
    config.train.num_steps = 2000
    config.checkpoint.every = 500
  return config
