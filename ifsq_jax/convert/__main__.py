"""``python -m ifsq_jax.convert KIND --checkpoint FILE --out DIR [--allow_partial]``.

Kinds: ``dinov2`` (Hugging Face safetensors or torch-hub .pth), ``inception`` (pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``). It reports what it
mapped and refuses a partial mapping unless ``--allow_partial`` is given.
"""

from __future__ import annotations

import argparse
import sys

from ifsq_jax.convert import dinov2, inception, torch_io

KINDS = {"dinov2": dinov2.convert_file, "inception": inception.convert_file}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ifsq_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("kind", choices=sorted(KINDS))
  parser.add_argument("--checkpoint", required=True, help="PyTorch weights: .safetensors, or .pth/.ckpt of tensors")
  parser.add_argument("--out", required=True, help="output directory (config.json + params.safetensors)")
  parser.add_argument("--allow_partial", action="store_true", help="convert even if some entries are not mapped")
  args = parser.parse_args(argv)
  try:
    cfg = KINDS[args.kind](args.checkpoint, args.out, args.allow_partial)
  except (torch_io.ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Converted {args.kind} {cfg} from {args.checkpoint} to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
