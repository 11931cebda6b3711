"""Matmul and convolution FLOPs of a function, counted on its jaxpr.

XLA's cost analysis counts the body of a loop once, so the step of a model whose
layers run under ``nn.scan`` reports the FLOPs of one layer. Here a ``scan``
counts ``length`` times its body, a ``cond`` its most expensive branch, and
rematerialised blocks as often as they appear in the differentiated program (the
recomputation included). Only ``dot_general`` and ``conv_general_dilated`` are
counted (2 per multiply-add): elementwise work is a small share of these models.
A ``while`` loop whose trip count is unknown counts once.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jax_core


def _dot(eqn) -> float:
  lhs = eqn.invars[0].aval
  (contract, _), _ = eqn.params["dimension_numbers"]
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)


def _conv(eqn) -> float:
  kernel = eqn.invars[1].aval
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  per_output = math.prod(kernel.shape[d] for d in spec[1:])  # in features per group x window
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _subjaxprs(eqn) -> list[Any]:
  out = []
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        out.append(v.jaxpr)
      elif isinstance(v, jax_core.Jaxpr):
        out.append(v)
  return out


def jaxpr_flops(jaxpr: Any) -> float:
  """FLOPs of one evaluation of a (closed) jaxpr."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot(eqn)
    elif name == "conv_general_dilated":
      total += _conv(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      total += sum(jaxpr_flops(sub) for sub in _subjaxprs(eqn))
  return total


def count(fn: Callable[..., Any], *args: Any) -> float:
  """FLOPs of ``fn(*args)`` (arrays or ``jax.ShapeDtypeStruct``); nothing is run."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args))
