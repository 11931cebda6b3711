"""Every config error comes at start, from ``python -m ifsq_jax.main``, before the work dir exists.

One row per field with a range or a closed set, for every task (toy, tokenizer, DiT, LlamaGen): the
field set to a bad value on the command line, the exit status (1: ``sys.exit`` with the message), the
one line naming the key, the value and what is valid, and no work dir afterwards. The rows run
``ifsq_jax.main.main`` in this process, on tiny configs, so each stops within milliseconds; one row runs
as a subprocess for the real exit status and stderr.
"""

import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from absl import flags
from conftest import subprocess_env

from ifsq_jax import main as main_lib
from ifsq_jax.convert import torch_io
from ifsq_jax.models.tokenizer import Tokenizer, TokenizerConfig
from ifsq_jax.train import loop, registry

# Tiny configs of each task; the generators read the tokenizer written by the `files` fixture ({tokenizer}).
CONFIGS = {
    "toy": """
from ifsq_jax.train import toy
def get_config():
  c = toy.default_config()
  c.data.image_size = 16
  c.model.width, c.model.mlp_width = 16, 32
  return c
""",
    "tokenizer": """
from ifsq_jax.train import tokenizer
def get_config():
  return tokenizer.small_cpu_config(tokenizer.default_config())
""",
    "dit": """
from ifsq_jax.train import dit
def get_config():
  c = dit.default_config()
  c.tokenizer = {tokenizer!r}
  c.data.image_size, c.data.transform, c.data.eval_examples = 32, "resize_crop_flip", 16
  c.model = dit.model_fields("S", 1, depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=9,
                             encoder_depth=1, projector_dim=32)
  dit.set_repa(c, "none")
  c.train.compute_dtype, c.train.global_batch_size = "float32", 8
  c.sample.num_steps, c.sample.batch_size, c.eval.num_samples = 2, 8, 8
  return c
""",
    "llamagen": """
from ifsq_jax.train import llamagen
def get_config():
  c = llamagen.default_config()
  c.tokenizer = {tokenizer!r}
  c.data.image_size, c.data.transform, c.data.eval_examples = 32, "resize_crop_flip", 16
  c.tokens.group_sizes = (2, 2)
  c.model = llamagen.model_fields("S", depth=2, hidden_size=32, num_heads=2, grid_size=8, num_classes=9,
                                  vocab_sizes=(289, 25), encoder_depth=1, projector_dim=32)
  llamagen.set_repa(c, "none")
  c.train.compute_dtype, c.train.global_batch_size = "float32", 8
  c.sample.batch_size, c.eval.num_samples, c.eval.cknna_batch, c.eval.cknna_topk = 8, 24, 12, 3
  return c
""",
}

# (override, the key and value as the message names them, what the message says is valid). Fields of
# config_lib.base_config and add_image_data: every task has them.
SHARED = [
    ("task=tokenzer", "config.task='tokenzer'", "use one of"),
    ("seed=-1", "config.seed=-1", "in [0, "),
    ("mesh.data=3", "3", "there are 8"),
    ("mesh.fsdp=3", "3", "multiple of 3"),
    ("mesh.tensor=0", "'tensor': 0", "config.mesh.data/fsdp/tensor must be >= 1"),
    ("mesh.slices=3", "config.mesh.slices=3", "divide the data axis"),
    ("mesh.rules=(('embed','model'),)", "config.mesh.rules", "names mesh axes"),
    ("mesh.platform=npu", "config.mesh.platform='npu'", "use one of"),
    ("train.num_steps=0", "config.train.num_steps=0", ">= 1"),
    ("train.global_batch_size=12", "config.train.global_batch_size=12", "use a multiple of 8"),
    ("train.grad_accum_steps=0", "config.train.grad_accum_steps=0", ">= 1"),
    ("train.log_every=0", "config.train.log_every=0", ">= 1"),
    ("train.eval_every=-1", "config.train.eval_every=-1", ">= 0"),
    ("train.image_every=-1", "config.train.image_every=-1", ">= 0"),
    ("train.ema_decay=1.0", "config.train.ema_decay=1.0", "in [0, 1)"),
    ("train.max_nonfinite_steps=0", "config.train.max_nonfinite_steps=0", ">= 1"),
    ("train.compute_dtype=float64", "config.train.compute_dtype='float64'", "'float32' or 'bfloat16'"),
    ("optimizer.lr=0", "config.optimizer.lr=0.0", "> 0"),
    ("optimizer.b1=1.0", "config.optimizer.b1=1.0", "in [0, 1)"),
    ("optimizer.b2=-0.1", "config.optimizer.b2=-0.1", "in [0, 1)"),
    ("optimizer.eps=0", "config.optimizer.eps=0.0", "> 0"),
    ("optimizer.weight_decay=-1", "config.optimizer.weight_decay=-1.0", ">= 0"),
    ("optimizer.decay_mask=none", "config.optimizer.decay_mask='none'", "one of"),
    ("optimizer.grad_clip_norm=-1", "config.optimizer.grad_clip_norm=-1.0", ">= 0"),
    ("optimizer.schedule=linear", "config.optimizer.schedule='linear'", "one of"),
    ("optimizer.warmup_steps=-5", "config.optimizer.warmup_steps=-5", ">= 0"),
    ("optimizer.min_lr_ratio=1.5", "config.optimizer.min_lr_ratio=1.5", "in [0, 1]"),
    ("checkpoint.every=0", "config.checkpoint.every=0", ">= 1"),
    ("checkpoint.keep=0", "config.checkpoint.keep=0", ">= 1"),
    ("data.name=imagenet", "config.data.name='imagenet'", "use one of"),
    ("data.name=image_folder", "config.data.path", "image folder root"),
    ("data.name=idx", "config.data.path", "IDX files"),
    ("data.workers=-2", "config.data.workers=-2", ">= 0"),
    ("data.prefetch=-1", "config.data.prefetch=-1", ">= 0"),
    ("data.device_prefetch=-1", "config.data.device_prefetch=-1", ">= 0"),
    ("data.image_size=4", "config.data.image_size=4", ">= 8"),
    ("data.transform=flip", "config.data.transform='flip'", "one of"),
    ("data.eval_examples=0", "config.data.eval_examples=0", ">= 1"),
]

# The fields both generators share (train/generator.py) and each task's own.
GENERATOR = [
    ("tokenizer=", "config.tokenizer is empty", "configs/quickstart.py"),
    ("repa.target=dino", "config.repa.target='dino'", "use one of"),
    ("repa.coef=-1", "config.repa.coef=-1.0", ">= 0"),
    ("model.hidden_size=0", "config.model.hidden_size=0", ">= 1"),
    ("model.depth=0", "config.model.depth=0", ">= 1"),
    ("model.num_heads=0", "config.model.num_heads=0", ">= 1"),
    ("model.num_heads=3", "config.model.hidden_size=32", "multiple of config.model.num_heads=3"),
    ("model.num_classes=0", "config.model.num_classes=0", ">= 1"),
    ("model.projector_dim=0", "config.model.projector_dim=0", ">= 1"),
    ("model.class_dropout_prob=1.0", "config.model.class_dropout_prob=1.0", "in [0, 1)"),
    ("model.z_dim=64", "config.model.z_dim=64", "0 without REPA"),
    ("model.attention_impl=flash", "config.model.attention_impl='flash'", "use one of"),
    ("model.remat_policy=some", "config.model.remat_policy='some'", "use one of"),
    ("sample.batch_size=0", "config.sample.batch_size=0", ">= 1"),
    ("sample.cfg_scale=-1", "config.sample.cfg_scale=-1.0", ">= 0"),
    ("sample.cfg_interval=(0.5,0.2)", "config.sample.cfg_interval=(0.5, 0.2)", "use"),
    ("eval.num_samples=1", "config.eval.num_samples=1", ">= 2"),
    ("eval.grid_classes=0", "config.eval.grid_classes=0", ">= 1"),
    ("eval.grid_per_class=0", "config.eval.grid_per_class=0", ">= 1"),
    ("eval.fid_reference=nowhere.npz", "config.eval.fid_reference='nowhere.npz' does not exist", "or ''"),
]

TASK = {
    "toy": [
        ("model.levels=(1,5)", "config.model.levels=(1, 5)", ">= 2"),
        ("model.levels=()", "config.model.levels=()", "at least one"),
        ("model.width=0", "config.model.width=0", ">= 1"),
        ("model.mlp_width=0", "config.model.mlp_width=0", ">= 1"),
        ("data.image_size=18", "config.data.image_size=18", "multiple of 4"),
    ],
    "tokenizer": [
        ("model.bottleneck=foo", "config.model.bottleneck='foo'", "use one of"),
        ("loss.rec_type=huber", "config.loss.rec_type='huber'", "use one of"),
        ("model.levels=(17,17,17)", "config.model.levels=(17, 17, 17)", "embed_dim=4"),
        ("model.levels=(1,17,17,17)", "config.model.levels=(1, 17, 17, 17)", ">= 2"),
        ("model.group_sizes=(3,2)", "config.model.group_sizes=(3, 2)", "sum to"),
        ("model.levels=(999,999,999,999)", "config.model.levels=(999, 999, 999, 999)", "group_sizes=(2, 2)"),
        ("loss.disc_layers=0", "config.loss.disc_layers=0", ">= 1"),
        ("loss.disc_ndf=0", "config.loss.disc_ndf=0", ">= 1"),
        ("loss.disc_start=-1", "config.loss.disc_start=-1", ">= 0"),
        ("loss.perceptual_weight=-1", "config.loss.perceptual_weight=-1.0", ">= 0"),
        ("loss.disc_weight=-1", "config.loss.disc_weight=-1.0", ">= 0"),
        ("loss.disc_factor=-1", "config.loss.disc_factor=-1.0", ">= 0"),
        ("loss.kl_weight=-1", "config.loss.kl_weight=-1.0", ">= 0"),
        ("loss.codebook_weight=-1", "config.loss.codebook_weight=-1.0", ">= 0"),
        ("model.hidden_size=48", "config.model.hidden_size=48", "multiple of 32"),
        ("model.hidden_size_mult=(1,0,2)", "config.model.hidden_size_mult=(1, 0, 2)", ">= 1"),
        ("model.num_res_blocks=0", "config.model.num_res_blocks=0", ">= 1"),
        ("model.z_channels=0", "config.model.z_channels=0", ">= 1"),
        ("model.embed_dim=0", "config.model.embed_dim=0", ">= 1"),
        ("model.vq_codebook_size=0", "config.model.vq_codebook_size=0", ">= 1"),
        ("model.attn_resolutions=(0,)", "config.model.attn_resolutions=(0,)", ">= 1"),
        ("model.dropout=1.0", "config.model.dropout=1.0", "in [0, 1)"),
        ("model.vq_beta=-1", "config.model.vq_beta=-1.0", ">= 0"),
        ("model.conv_impl=cudnn", "config.model.conv_impl='cudnn'", "use one of"),
        ("model.downsample=(True,True)", "downsample (True, True)", "one entry per level"),
        ("data.image_size=34", "config.data.image_size=34", "multiple of the tokenizer's downsampling factor 4"),
    ],
    "dit": [
        ("transport.time_kind=beta", "config.transport.time_kind='beta'", "use one of"),
        ("transport.sigma=0", "config.transport.sigma=0.0", "> 0"),
        ("transport.shift=0", "config.transport.shift=0.0", "> 0"),
        ("latent.scale=-1", "config.latent.scale=-1.0", ">= 0"),
        ("latent.scale_batches=0", "config.latent.scale_batches=0", ">= 1"),
        ("model.input_size=0", "config.model.input_size=0", ">= 1"),
        ("model.patch_size=0", "config.model.patch_size=0", ">= 1"),
        ("model.patch_size=3", "config.model.patch_size=3", "must divide config.model.input_size=8"),
        ("model.in_channels=0", "config.model.in_channels=0", ">= 1"),
        ("model.mlp_ratio=0", "config.model.mlp_ratio=0.0", "> 0"),
        ("model.hidden_size=36", "config.model.hidden_size=36", "4 x num_heads=2"),
        ("model.attention_impl=cudnn", "config.model.attention_impl='cudnn'", "GPUs in bfloat16 or float16"),
        ("sample.method=rk4", "config.sample.method='rk4'", "use one of"),
        ("sample.mode=flow", "config.sample.mode='flow'", "use one of"),
        ("sample.num_steps=0", "config.sample.num_steps=0", ">= 1"),
        ("sample.mode=sde", "config.sample.num_steps=1", ">= 2 for mode='sde'", ("sample.num_steps=1",)),
        ("sample.shift=-1", "config.sample.shift=-1.0", ">= 0"),
        ("sample.cfg_channels=5", "config.sample.cfg_channels=5", "[0, 4]"),
        # Known only once the tokenizer is opened: still before the work dir.
        ("model.input_size=16", "input_size=16", "8 x 8"),
    ],
    "llamagen": [
        ("model.token_dropout_prob=1.0", "config.model.token_dropout_prob=1.0", "in [0, 1)"),
        ("model.dropout_prob=-0.1", "config.model.dropout_prob=-0.1", "in [0, 1)"),
        ("model.grid_size=0", "config.model.grid_size=0", ">= 1"),
        ("model.factorized_depth=0", "factorized_depth=0", ">= 1"),
        ("model.vocab_sizes=(289,0)", "config.model.vocab_sizes=(289, 0)", ">= 1"),
        ("model.hidden_size=36", "config.model.hidden_size=36", "multiple of 4"),
        ("model.attention_impl=cudnn", "config.model.attention_impl='cudnn'", "GPUs in bfloat16 or float16"),
        ("tokens.group_sizes=(2,0)", "config.tokens.group_sizes=(2, 0)", ">= 1"),
        ("tokens.group_weights=(1.0,-1.0)", "config.tokens.group_weights=(1.0, -1.0)", ">= 0"),
        ("tokens.group_weights=(1.0,)", "config.tokens.group_weights=(1.0,)", "one weight per token group"),
        ("eval.cknna_topk=1", "cknna_topk (1)", "2 <= cknna_topk"),
        ("eval.cknna_batch=30", "cknna_batch (30)", "<= num_samples (24)"),
        ("sample.temperature=-1", "config.sample.temperature=-1.0", ">= 0"),
        ("sample.top_k=-1", "config.sample.top_k=-1", ">= 0"),
        ("sample.top_p=1.5", "config.sample.top_p=1.5", "in [0, 1]"),
        # Known only once the tokenizer is opened: still before the work dir.
        ("tokens.group_sizes=(1,3)", "config.model (vocab_sizes=(289, 25)", "vocab_sizes=(17, 425)"),
    ],
}

ROWS = [(task, *row) for task in CONFIGS for row in SHARED + TASK[task] + (GENERATOR if task in ("dit", "llamagen")
                                                                         else [])]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """{task: config file}: tiny configs; the generators' tokenizer is a small random converted one."""
  root = tmp_path_factory.mktemp("config_errors")
  cfg = TokenizerConfig(hidden_size=32, hidden_size_mult=(1, 1, 1), num_res_blocks=1, downsample=(True, True, False),
                        upsample=(False, True, True), resolution=32, levels=(17, 17, 5, 5))
  params = nn.meta.unbox(Tokenizer(cfg).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"])
  torch_io.save_converted(str(root / "tok"), params, {"kind": "tokenizer", "model": dataclasses.asdict(cfg)})
  out = {}
  for task, text in CONFIGS.items():
    out[task] = root / f"{task}_config.py"
    out[task].write_text(text.format(tokenizer=str(root / "tok")))
  return out


def _passed_validation(*args, **kwargs):
  raise AssertionError("the config passed validation")


def run_main(argv: list[str], monkeypatch) -> object:
  """``python -m ifsq_jax.main ARGV`` in this process; returns ``SystemExit.code`` (None: it returned)."""
  fv = flags.FLAGS
  for name in [n for n in fv if n.startswith("config.")]:  # the previous run's override flags
    delattr(fv, name)
  fv.unparse_flags()
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
  fv(argv)
  # A config that passes validation would go on to train: stop it where the run starts building its state.
  monkeypatch.setattr(loop, "abstract_state", _passed_validation)
  try:
    main_lib.main(argv[:1])
  except SystemExit as e:
    return e.code
  return None


@pytest.mark.parametrize("task,override,named,allowed,extra", [r if len(r) == 5 else (*r, ()) for r in ROWS],
                         ids=[f"{r[0]}:{r[1]}" for r in ROWS])
def test_bad_value_stops_at_start_with_one_line_and_no_workdir(files, tmp_path, monkeypatch, task, override, named,
                                                                allowed, extra):
  workdir = tmp_path / "run"
  argv = ["ifsq_jax.main", f"--config={files[task]}", f"--workdir={workdir}",
          *(f"--config.{o}" for o in (override, *extra))]
  code = run_main(argv, monkeypatch)
  # sys.exit with a message: Python prints it to stderr and exits with status 1.
  assert isinstance(code, str), f"{task} {override}: exited with {code!r}, not a config error"
  assert code.startswith("Invalid config: ") and "\n" not in code, code
  assert named in code and allowed in code, code
  assert not workdir.exists()


def test_tiny_configs_are_valid(files, monkeypatch):
  """The rows fail for their own field: without an override, every task gets past validation."""
  for task, path in files.items():
    monkeypatch.setattr(sys, "argv", ["x", f"--config={path}"])
    fv = flags.FLAGS
    for name in [n for n in fv if n.startswith("config.")]:
      delattr(fv, name)
    fv.unparse_flags()
    fv(["x", f"--config={path}", "--workdir=unused"])
    trainer = registry.get(task)
    loop.validate(trainer.TRAINER, fv.config, trainer.default_config(), len(jax.devices()))


def test_exit_status_is_1_and_stderr_one_line(files, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "ifsq_jax.main", f"--config={files['toy']}", f"--workdir={workdir}",
                         "--config.optimizer.b2=1.0"], env=subprocess_env(), capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == "Invalid config: config.optimizer.b2=1.0 must be in [0, 1)."
  assert not workdir.exists()
