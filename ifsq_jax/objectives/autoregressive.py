"""The LlamaGen objective: next-token cross-entropy in float32, plus REPA on the hidden states.

As the reference's ``llamagen/train.py``: the mean cross-entropy over every
position and sequence (``F.cross_entropy`` of the flattened logits); a
factorized model sums its groups' cross-entropies (each optionally weighted, the
reference's ``loss_weights``); REPA aligns the projector output at position n
(the hidden state that predicts token n) with the target feature of patch n:

  loss = sum_g w_g CE_g + proj_coef * proj,   proj = -mean_{b, n} cos(target_{b,n}, z_{b,n})

B batch, N tokens, V vocabulary (V_g of group g), Z REPA width.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ifsq_jax.objectives.transport import repa_loss


def cross_entropy(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and top-1 accuracy (float32 scalars) of logits (B, N, V) for int tokens (B, N)."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32))
  return jnp.mean(nll), accuracy


def token_loss(logits: jax.Array | Sequence[jax.Array], tokens: jax.Array, *, repa_features: jax.Array | None = None,
               repa_target: jax.Array | None = None, proj_coef: float = 2.0,
               group_weights: Sequence[float] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss and its terms.

  Args:
    logits: (B, N, V) float32, or for a factorized model a sequence of G arrays (B, N, V_g).
    tokens: (B, N) int, or (B, N, G) for a factorized model.
    repa_features: The projector output (B, N, Z), or None for no REPA term.
    repa_target: Target features (B, N, Z) (no gradient flows into them).
    proj_coef: Weight of the REPA term.
    group_weights: One weight per group (default all 1).

  Returns:
    (loss, terms): ``ce`` (the weighted sum), ``ce_g`` per group of a factorized
    model, ``accuracy`` (mean top-1 over groups) and ``proj`` (0 without REPA).
  """
  groups = (logits,) if isinstance(logits, jax.Array) else tuple(logits)
  token_groups = (tokens,) if len(groups) == 1 and tokens.ndim == 2 else tuple(
      tokens[..., g] for g in range(tokens.shape[-1]))
  if len(token_groups) != len(groups):
    raise ValueError(f"{len(groups)} logit groups for tokens of shape {tokens.shape}.")
  weights = tuple(group_weights) if group_weights else (1.0,) * len(groups)
  if len(weights) != len(groups):
    raise ValueError(f"group_weights={weights} must have one weight per group ({len(groups)}).")
  terms = {}
  ce, accuracy = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  for g, (l, t, w) in enumerate(zip(groups, token_groups, weights)):
    ce_g, acc_g = cross_entropy(l, t)
    if len(groups) > 1:
      terms[f"ce_{g}"] = ce_g
    ce, accuracy = ce + w * ce_g, accuracy + acc_g / len(groups)
  if (repa_features is None) != (repa_target is None):
    raise ValueError("pass both repa_features and repa_target for the REPA term, or neither.")
  proj = jnp.zeros((), jnp.float32)
  if repa_features is not None:
    proj = repa_loss(repa_features, repa_target)
  return ce + proj_coef * proj, {**terms, "ce": ce, "accuracy": accuracy, "proj": proj}
