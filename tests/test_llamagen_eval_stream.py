"""LlamaGen's CKNNA in the streamed evaluation: fed sampler call by call, the numbers of the gathered samples."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_llamagen_train import tiny_config, tokenizer_dir  # noqa: F401  (a fixture)

from ifsq_jax import parallel
from ifsq_jax.train import llamagen


def test_cknna_streamed_by_sampler_call_equals_cknna_of_the_gathered_samples(tokenizer_dir):  # noqa: F811
  c = tiny_config(tokenizer_dir)  # 24 samples in calls of 8; CKNNA batches of 12 straddle the calls
  assert (c.eval.num_samples, c.sample.batch_size, c.eval.cknna_batch) == (24, 8, 12)
  trainer = llamagen.LlamaGenTrainer(c, parallel.make_mesh())
  state = jax.jit(lambda k: nn.meta.unbox(trainer.init_state(k)))(jax.random.key(1))
  got = trainer.evaluate(state, step=0)
  labels = np.arange(24) % 9
  want = trainer.sample_metrics(state, trainer.sample_all(state, labels, seed=c.seed + 1), labels)
  names = sorted(k for k in want if k.startswith("cknna/"))
  assert names == ["cknna/layer-0", "cknna/layer-2"] and {"fd_vgg16", "samples"} <= set(got)
  for name in names:
    assert got[name] == pytest.approx(want[name], abs=1e-5), name
