r"""ADM's generative metrics of a sample batch against a reference batch: FID, sFID, IS, precision, recall.

  python -m ifsq_jax.tools.fid SAMPLES.npz --ref REF.npz [--inception DIR] [--batch 64] \
      [--out metrics.json] [--cache_dir DIR] [--preprocess adm|pytorch_fid]

Both files are ADM's ``.npz`` batches: ``arr_0`` uint8 (N, H, W, 3) images
(``ifsq_jax.eval.fid.save_samples_npz`` writes them). The reference may also
hold precomputed statistics, as ADM's ``VIRTUAL_imagenet256_labeled.npz`` does
(``arr_0`` and ``mu``, ``sigma``, ``mu_s``, ``sigma_s``); as in ADM's evaluator
these are used for FID and sFID, and the reference images for precision /
recall. With ``--inception`` (a directory from ``python -m ifsq_jax.convert
inception``) the output holds, as ADM's evaluator computes them
(``ifsq_jax.eval.generative``):

* ``fid``: Frechet distance of the 2048-d pool features.
* ``sfid``: Frechet distance of the spatial features (``mixed_6/conv``, 7
  channels at 17 x 17; see ``ifsq_jax.nets.inception``).
* ``inception_score``: the classifier without its bias, in splits of 5000
  samples (near-equal splits when N is not a multiple of 5000; see
  ``ifsq_jax.eval.generative.inception_score_split``).
* ``precision`` / ``recall``: k = 3 nearest-neighbour manifolds of the pool
  features of the samples and the reference images.
* ``ref_check_fid`` / ``ref_check_sfid`` (when the reference holds both images
  and statistics): the distance between the statistics of its images computed
  here and the published ones; it measures how far this Inception is from the
  TF graph that made them, plus any difference in the images they summarise.

and always ``fd_vgg16`` (VGG16 features that ship with the package; not FID,
not comparable with it). The features come from ``ifsq_jax.eval.features``,
the in-training evaluation's too. Images enter the Inception as the TF graph
ADM runs takes them (``--preprocess adm``: TF1's bilinear resize to 299,
``(x - 128) / 128``), at float32 matmul precision.

The reference's features are computed once and cached beside it (or in
``--cache_dir``): ``<name>.inception-<key>.npz`` (pool features and statistics;
the key covers the weights, the preprocessing and the reference file's size and
time) and ``<name>.vgg16-<key>.npz``. Samples are read in batches, never whole.
One process on its default device. Every path may be ``gs://...``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import zipfile
from typing import Any, Iterator, Sequence

import numpy as np
from etils import epath

from ifsq_jax import paths
from ifsq_jax.eval import features, generative
from ifsq_jax.eval.features import FeatureExtractor
from ifsq_jax.kernels.cpu import host_memory

CONVERT_HINT = ("FID, sFID, the Inception Score, precision and recall need the FID Inception: convert "
                "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) with `python -m ifsq_jax.convert "
                "inception --checkpoint FILE --out DIR` and pass --inception DIR.")
STATS = ("mu", "sigma", "mu_s", "sigma_s")


def _members(path: epath.PathLike) -> list[str]:
  """Array names of an ``.npz``."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist.")
  try:
    with path.open("rb") as file, zipfile.ZipFile(file) as zf:
      return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
  except zipfile.BadZipFile:
    raise ValueError(f"{path} is not an .npz file (a zip of .npy arrays, as np.savez writes).") from None


@contextlib.contextmanager
def _npy_member(path: epath.PathLike, key: str) -> Iterator[tuple[Any, tuple[int, ...], np.dtype]]:
  """(file object at the start of the data, shape, dtype) of array ``key`` of an ``.npz``, nothing read yet."""
  if key not in _members(path):
    raise ValueError(f"{path} has no {key!r}: ADM's batches hold the images as 'arr_0' (it has {_members(path)}).")
  with epath.Path(path).open("rb") as file, zipfile.ZipFile(file) as zf, zf.open(f"{key}.npy") as f:
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
      raise ValueError(f"{path}:{key} is a .npy of format {version}; write it with np.savez (format 1.0 or 2.0).")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran:
      raise ValueError(f"{path}:{key} is stored in Fortran order; write it with np.savez from a C-ordered array.")
    yield f, shape, dtype


def check_images(path: epath.PathLike, key: str = "arr_0") -> tuple[int, ...]:
  """The shape (N, H, W, 3) of the uint8 images ``key`` of an ``.npz``, read from its header.

  Raises:
    FileNotFoundError: for a missing file.
    ValueError: for a file that is not an npz, lacks ``key``, or holds no uint8 NHWC RGB images.
  """
  with _npy_member(path, key) as (_, shape, dtype):
    if dtype != np.uint8:
      raise ValueError(f"{path}:{key} is {dtype}; ADM's batches hold uint8 images (N, H, W, 3) in [0, 255] "
                       "(ifsq_jax.eval.fid.save_samples_npz converts [-1, 1] floats).")
    if len(shape) != 4 or shape[-1] != 3 or 0 in shape:
      raise ValueError(f"{path}:{key} has shape {shape}; valid: (N, H, W, 3) with N, H, W >= 1.")
    return tuple(shape)


def iter_images(path: epath.PathLike, batch: int, key: str = "arr_0") -> Iterator[np.ndarray]:
  """uint8 batches (<= batch, H, W, 3) of the images of an ``.npz``, read one batch at a time."""
  shape = check_images(path, key)
  per_image = int(np.prod(shape[1:]))
  with _npy_member(path, key) as (f, _, _):
    for start in range(0, shape[0], batch):
      n = min(batch, shape[0] - start)
      data = f.read(n * per_image)
      if len(data) != n * per_image:
        raise ValueError(f"{path}:{key} ends after {start} images + {len(data)} bytes; the header says {shape}.")
      yield np.frombuffer(data, np.uint8).reshape((n, *shape[1:]))


def _features(path: epath.PathLike, extractor: FeatureExtractor, inception: bool = True) -> dict[str, Any]:
  """:func:`ifsq_jax.eval.features.summarize` of the images of ``path``, read one batch at a time."""
  return features.summarize(iter_images(path, extractor.batch), extractor, inception, label=str(path))


def _cache_path(ref: epath.PathLike, cache_dir: epath.PathLike | None, kind: str, *key_parts: str) -> epath.Path:
  ref = paths.absolute(ref)
  st = ref.stat()  # size and modification time (whole seconds: what a bucket's object gives)
  key = hashlib.sha256("|".join((*key_parts, str(st.length), str(st.mtime))).encode()).hexdigest()[:16]
  return (epath.Path(cache_dir) if cache_dir else ref.parent) / f"{ref.stem}.{kind}-{key}.npz"


def _save_cache(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with paths.atomic_open(path) as f:
      np.savez(f, **arrays)
  except OSError as e:  # a read-only reference directory: go on without the cache
    logging.warning("Could not cache the reference features at %s (%s); use --cache_dir.", path, e)


def reference_features(ref: epath.PathLike, extractor: FeatureExtractor, cache_dir: epath.PathLike | None = None) -> dict[str, np.ndarray]:
  """The reference images' features for the metrics, computed once and cached.

  Returns:
    ``vgg_mu``, ``vgg_sigma`` and, with the Inception, ``pool`` (N, 2048) and the
    statistics ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` computed here; empty when
    the reference holds no images.
  """
  if "arr_0" not in _members(ref):
    logging.warning("%s holds no reference images (arr_0): no fd_vgg16, precision or recall.", ref)
    return {}
  check_images(ref)
  out: dict[str, np.ndarray] = {}
  vgg_path = _cache_path(ref, cache_dir, "vgg16")
  inc_path = (_cache_path(ref, cache_dir, "inception", extractor.inception_key, extractor.preprocess)
              if extractor.has_inception else None)
  for path in (vgg_path, inc_path):
    if path and path.exists():
      with path.open("rb") as file, np.load(file) as f:
        out.update({k: f[k] for k in f.files})
  need_vgg, need_inception = "vgg_mu" not in out, inc_path is not None and "pool" not in out
  if need_vgg or need_inception:
    feats = _features(ref, extractor, inception=need_inception)
    if need_vgg:
      vgg = {"vgg_mu": feats["stats"]["vgg16"].mu, "vgg_sigma": feats["stats"]["vgg16"].sigma}
      _save_cache(vgg_path, vgg)
      out.update(vgg)
    if need_inception:
      s = feats["stats"]
      inc = {"pool": feats["pool"], "mu": s["pool"].mu, "sigma": s["pool"].sigma, "mu_s": s["spatial"].mu,
             "sigma_s": s["spatial"].sigma}
      _save_cache(inc_path, inc)
      out.update(inc)
  return out


def _published_stats(ref: epath.PathLike) -> dict[str, np.ndarray]:
  """The reference's precomputed statistics (ADM's ``mu``, ``sigma``, ``mu_s``, ``sigma_s``) that it holds."""
  names = _members(ref)
  with epath.Path(ref).open("rb") as file, np.load(file) as f:
    return {k: f[k] for k in STATS if k in names}


def evaluate(samples: epath.PathLike, ref: epath.PathLike, inception_dir: epath.PathLike | None = None,
             batch: int = 64, cache_dir: epath.PathLike | None = None, preprocess: str = "adm") -> dict[str, Any]:
  """The metrics of the sample batch ``samples`` against the reference batch ``ref`` (see the module doc).

  Raises:
    FileNotFoundError: for a missing file or converted directory.
    ValueError: for a file that is not an ADM batch, or samples too few for the metrics.
  """
  n = check_images(samples)[0]
  if n <= generative.PR_NEIGHBOURS:
    raise ValueError(f"{samples} holds {n} images; the metrics need more than {generative.PR_NEIGHBOURS}.")
  published = _published_stats(ref)
  if "arr_0" not in _members(ref) and not published:
    raise ValueError(f"{ref} holds neither reference images (arr_0) nor statistics ({', '.join(STATS)}).")
  extractor = FeatureExtractor(inception_dir, batch, preprocess)
  ref_feats = reference_features(ref, extractor, cache_dir)
  feats = _features(samples, extractor)
  out: dict[str, Any] = {"samples_npz": str(samples), "ref_npz": str(ref), "samples": n}
  if "vgg_mu" in ref_feats:
    vgg = feats["stats"]["vgg16"]
    out["fd_vgg16"] = generative.frechet_distance(vgg.mu, vgg.sigma, ref_feats["vgg_mu"], ref_feats["vgg_sigma"])
  if not extractor.has_inception:
    return out
  references, checks = {}, {}
  for name, (mu, sigma) in {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}.items():
    ours = (ref_feats[mu], ref_feats[sigma]) if mu in ref_feats else None
    theirs = (published[mu], published[sigma]) if mu in published and sigma in published else None
    if theirs is None and ours is None:
      logging.warning("%s holds neither %s / %s nor images to compute them from: no %s.", ref, mu, sigma, name)
    references[name] = theirs or ours  # ADM: the published statistics first
    if theirs is not None and ours is not None:
      checks[name] = generative.frechet_distance(*ours, *theirs)
  real_pool = ref_feats.get("pool")
  if real_pool is not None and len(real_pool) <= generative.PR_NEIGHBOURS:
    raise ValueError(f"{ref} holds {len(real_pool)} images; precision and recall need more than "
                     f"{generative.PR_NEIGHBOURS}.")
  metrics = features.generative_metrics(feats, references["fid"], references["sfid"], real_pool)
  for name in ("fid", "sfid"):  # each distance, then its check
    if name in metrics:
      out[name] = metrics.pop(name)
    if name in checks:
      out[f"ref_check_{name}"] = checks[name]
  out.update(metrics)
  if real_pool is not None:
    out["reference_images"] = len(real_pool)
  out["inception_preprocess"] = preprocess
  return out


_PRINTED = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
            ("recall", "Recall"), ("fd_vgg16", "fd_vgg16"))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ifsq_jax.tools.fid", description=__doc__.split("\n\n")[0])
  parser.add_argument("samples", help="sample batch .npz (arr_0: uint8 N x H x W x 3)")
  parser.add_argument("--ref", required=True, help="reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
  parser.add_argument("--inception", default=None, help="converted FID Inception dir (python -m ifsq_jax.convert "
                                                         "inception); without it only fd_vgg16")
  parser.add_argument("--batch", type=int, default=64, help="images per step (ADM: 64)")
  parser.add_argument("--out", default=None, help="write the metrics as JSON here")
  parser.add_argument("--cache_dir", default=None, help="where to cache the reference features (default: beside it)")
  parser.add_argument("--preprocess", default="adm", choices=("adm", "pytorch_fid"),
                      help="Inception input pipeline: adm (the TF graph's, default) or pytorch_fid")
  args = parser.parse_args(argv)
  if args.batch < 1:
    parser.error(f"--batch={args.batch} must be >= 1")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  if not args.inception:
    print(f"note: only fd_vgg16. {CONVERT_HINT}", file=sys.stderr)
  try:
    result = evaluate(args.samples, args.ref, args.inception, args.batch, args.cache_dir, args.preprocess)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.inception and "inception_score" not in result:
    print(f"note: {args.inception} was converted without the classifier (fc), so no Inception Score; convert "
          "the checkpoint again with `python -m ifsq_jax.convert inception`.", file=sys.stderr)
  for key, label in _PRINTED:
    if key in result:
      print(f"{label}: {result[key]}")
  if args.out:
    paths.write_text(args.out, json.dumps(result, indent=2))
    print(f"Wrote {args.out}")
  return 0


if __name__ == "__main__":
  host_memory.setup()  # before JAX's first computation; here, not in main(), which tests call in their process
  sys.exit(main())
