"""``python -m ifsq_jax.convert KIND --checkpoint FILE --out DIR [--allow_partial]``.

Kinds: ``dinov2`` (Hugging Face safetensors or torch-hub .pth), ``inception`` (pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``), ``vgg16`` (torchvision's VGG16, with
``--lpips_lin vgg.pth`` for the LPIPS heads), ``tokenizer`` (an official iFSQ ``checkpoint-*.ckpt``
with ``--config run.json``), ``dit`` (an official DiT checkpoint ``*.pt`` with ``--config run.yaml``,
else the config saved in the checkpoint), ``llamagen`` (an official LlamaGen checkpoint ``*.pt``
with ``--config config.yaml``, else the config saved in the checkpoint). ``tokenizer``, ``dit``
and ``llamagen`` take the EMA weights unless ``--no_ema`` is given. It reports what it
mapped and refuses a partial mapping unless ``--allow_partial`` is given; then every
checkpoint entry it dropped and every parameter left at its initial value is listed
(a warning on stderr) and counted in the final line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ifsq_jax.convert import dinov2, dit, inception, llamagen, tokenizer, torch_io, vgg16

KINDS = {"dinov2": dinov2.convert_file, "inception": inception.convert_file, "vgg16": vgg16.convert_file,
         "tokenizer": tokenizer.convert_file, "dit": dit.convert_file, "llamagen": llamagen.convert_file}
WITH_CONFIG = ("tokenizer", "dit", "llamagen")  # kinds that take --config and --no_ema


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ifsq_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("kind", choices=sorted(KINDS))
  parser.add_argument("--checkpoint", required=True, help="PyTorch weights: .safetensors, or .pth/.ckpt of tensors")
  parser.add_argument("--out", required=True, help="output directory (config.json + params.safetensors)")
  parser.add_argument("--allow_partial", action="store_true", help="convert even if some entries are not mapped")
  parser.add_argument("--lpips_lin", default=None, help="vgg16 only: LPIPS linear heads (vgg.pth)")
  parser.add_argument("--config", default=None,
                      help="tokenizer: the model's run.json / config.json; dit: the run's run.yaml; "
                           "llamagen: the run's config.yaml")
  parser.add_argument("--no_ema", action="store_true",
                      help="tokenizer: take state_dict, not ema_state_dict; dit, llamagen: take model, not ema")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  try:
    extra = {"lpips_lin": args.lpips_lin} if args.kind == "vgg16" else {}
    if args.kind in WITH_CONFIG:
      extra = {"config": args.config, "use_ema": not args.no_ema}
    if args.lpips_lin and args.kind != "vgg16":
      parser.error("--lpips_lin is only for vgg16")
    if (args.config or args.no_ema) and args.kind not in WITH_CONFIG:
      parser.error(f"--config and --no_ema are only for {' and '.join(WITH_CONFIG)}")
    cfg = KINDS[args.kind](args.checkpoint, args.out, args.allow_partial, **extra)
  except (torch_io.ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Converted {args.kind} {cfg} from {args.checkpoint} to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
