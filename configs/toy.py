r"""A tiny FSQ autoencoder on the embedded images: the smallest run of the shared loop.

  python -m ifsq_jax.main --config=configs/toy.py --workdir=out/toy
  python -m ifsq_jax.main --config=configs/toy.py:long --workdir=out/toy --config.optimizer.lr=1e-3
"""

from ifsq_jax.train import toy


def get_config(arg=None):
  config = toy.default_config()
  if arg == "long":
    config.train.num_steps = 2000
    config.checkpoint.every = 500
  elif arg:
    raise ValueError(f"configs/toy.py variant {arg!r} is not known; use no variant or 'long'.")
  return config
