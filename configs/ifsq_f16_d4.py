r"""The paper's tokenizer run: f16, d4, iFSQ with 17 levels, ImageNet 256, global batch 128, 100 epochs.

  python -m ifsq_jax.main --config=configs/ifsq_f16_d4.py --workdir=gs://BUCKET/ifsq_f16_d4 \
      --config.data.data_dir=gs://BUCKET/tfds

Variants (comma-separated): ``bits=K`` (levels 2^K + 1 per channel, K = 1..8; default 4 -> 17; from
8 bits on, 257^4 codes overflow int32 indices, so the channels get two index groups of 2),
``bound=ifsq|fsq`` (iFSQ or the original tanh bound), ``bottleneck=vq|kl|ae`` (the same encoder and
decoder around another bottleneck), ``tiny`` (a CPU-sized model on the embedded images), e.g.
``--config=configs/ifsq_f16_d4.py:bits=3,bound=fsq``.
"""

from ifsq_jax import config_lib
from ifsq_jax.train import tokenizer


def get_config(arg=None):
  v = config_lib.parse_variant(arg, bits=4, bound="ifsq", bottleneck="", tiny=False)
  c = tokenizer.default_config()
  c.data.name = "tfds"
  c.data.tfds_name = "imagenet2012"
  c.data.image_size = 256
  c.data.workers = -1  # every CPU of the host but one decodes and crops
  c.train.num_steps = 1_000_000  # 100 epochs of 1.28M images at batch 128
  c.train.compute_dtype = "bfloat16"
  if not 1 <= v.bits <= 8:
    raise config_lib.ConfigError(f"config variant bits={v.bits} must be in 1..8 (levels 2^bits + 1).")
  c.model.levels = (2**v.bits + 1,) * 4
  if (2**v.bits + 1)**4 > tokenizer.MAX_INDEX:
    c.model.group_sizes = (2, 2)
  if v.bound not in ("ifsq", "fsq"):
    raise config_lib.ConfigError(f"config variant bound={v.bound!r} must be ifsq or fsq.")
  c.model.bottleneck = v.bound
  if v.bottleneck:
    if v.bottleneck not in ("vq", "kl", "ae"):
      raise config_lib.ConfigError(f"config variant bottleneck={v.bottleneck!r} must be vq, kl or ae.")
    c.model.bottleneck = v.bottleneck
  if v.tiny:
    tokenizer.small_cpu_config(c)
  return c
