"""Flags the command-line tools share: running as one process of several (``jax.distributed``)."""

from __future__ import annotations

import argparse

import jax


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0 (several processes)")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)


def initialize_distributed(args: argparse.Namespace) -> None:
  """``jax.distributed.initialize`` when ``--num_processes`` > 1."""
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
