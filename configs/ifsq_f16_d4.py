r"""The paper's tokenizer run: f16, d4, iFSQ with 17 levels, ImageNet 256, global batch 128, 100 epochs.

  python -m ifsq_jax.main --config=configs/ifsq_f16_d4.py --workdir=gs://BUCKET/ifsq_f16_d4 \
      --config.data.data_dir=gs://BUCKET/tfds

Variants (comma-separated): ``bits=K`` (levels 2^K + 1 per channel, K = 1..8; default 4 -> 17),
``bound=ifsq|fsq`` (iFSQ or the original tanh bound), ``bottleneck=vq|kl|ae`` (the same encoder and
decoder around another bottleneck), ``tiny`` (a CPU-sized model on the embedded images), e.g.
``--config=configs/ifsq_f16_d4.py:bits=3,bound=fsq``.
"""

from ifsq_jax.train import tokenizer


def get_config(arg=None):
  c = tokenizer.default_config()
  c.data.name = "tfds"
  c.data.tfds_name = "imagenet2012"
  c.data.image_size = 256
  c.train.num_steps = 1_000_000  # 100 epochs of 1.28M images at batch 128
  c.train.compute_dtype = "bfloat16"
  options = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in (arg or "").split(",") if kv)
  unknown = set(options) - {"bits", "bound", "bottleneck", "tiny"}
  if unknown:
    raise ValueError(f"unknown variant options {sorted(unknown)}; use bits=K, bound=ifsq|fsq, bottleneck=vq|kl|ae, tiny.")
  if "bits" in options:
    bits = int(options["bits"])
    if not 1 <= bits <= 8:
      raise ValueError(f"bits={bits} must be in 1..8 (levels 2^bits + 1).")
    c.model.levels = (2**bits + 1,) * 4
  if options.get("bound", "ifsq") not in ("ifsq", "fsq"):
    raise ValueError(f"bound={options['bound']!r} must be ifsq or fsq.")
  c.model.bottleneck = options.get("bound", "ifsq")
  if "bottleneck" in options:
    if options["bottleneck"] not in ("vq", "kl", "ae"):
      raise ValueError(f"bottleneck={options['bottleneck']!r} must be vq, kl or ae.")
    c.model.bottleneck = options["bottleneck"]
  if "tiny" in options:
    tokenizer.small_cpu_config(c)
  return c
