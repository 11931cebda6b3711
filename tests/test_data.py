"""Data: the embedded default, image folders, tfds, transforms, and deterministic resumable batching."""

import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import toy_config
from ifsq_jax.data import pipeline, sources, transforms


def test_embedded_dataset_has_disjoint_deterministic_splits():
  train, val = sources.EmbeddedSource("train"), sources.EmbeddedSource("validation")
  assert len(train) > 300 and len(val) > 50
  assert {train[i][1] for i in range(len(train))} == set(range(9)) == {val[i][1] for i in range(len(val))}
  img, _ = train[0]
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8
  flat = {im.tobytes() for im in train.images}
  assert not any(im.tobytes() in flat for im in val.images)
  np.testing.assert_array_equal(sources.EmbeddedSource("train").images, train.images)
  with pytest.raises(sources.DataError, match="split 'test'"):
    sources.EmbeddedSource("test")


_crops = pipeline.image_example(transforms.resize_crop_flip, 16)


def _pipe(process_index=0, process_count=1, seed=0, batch=8):
  return pipeline.Pipeline(sources.EmbeddedSource("train"), _crops, batch, seed=seed,
                           process_index=process_index, process_count=process_count, prefetch=0)


def test_batches_are_a_pure_function_of_seed_and_step():
  a, b = _pipe(), _pipe()
  np.testing.assert_array_equal(a.batch(5)["image"], b.batch(5)["image"])
  assert not np.array_equal(a.batch(5)["image"], a.batch(6)["image"])
  assert not np.array_equal(a.batch(5)["image"], _pipe(seed=1).batch(5)["image"])
  x = a.batch(0)["image"]
  assert x.shape == (8, 16, 16, 3) and x.dtype == np.uint8  # made float inside the train step
  y = pipeline.normalize({"image": x})["image"]
  assert y.dtype == np.float32 and -1 <= y.min() and y.max() <= 1


def test_process_slices_concatenate_to_the_global_batch():
  whole = _pipe(batch=8).batch(3)
  parts = [_pipe(i, 2, batch=8).batch(3) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
  np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])


def test_an_epoch_visits_every_example_once():
  src = sources.EmbeddedSource("validation")
  p = pipeline.Pipeline(src, pipeline.image_example(transforms.center_crop, 16), len(src), seed=0, prefetch=0)
  seen = [p._example(i)[1] for i in range(len(src))]  # pylint: disable=protected-access
  assert sorted(seen) == list(range(len(src)))


def test_iterator_state_resumes_at_the_exact_example():
  p = pipeline.Pipeline(sources.EmbeddedSource("train"), _crops, 4, seed=3, prefetch=2)
  for _ in range(7):
    next(p)
  state = p.state()
  expected = next(p)
  q = pipeline.Pipeline(sources.EmbeddedSource("train"), _crops, 4, seed=3, prefetch=2)
  q.restore(state)
  np.testing.assert_array_equal(next(q)["image"], expected["image"])
  p.close()
  q.close()


def _folder(root, corrupt=False):
  rng = np.random.default_rng(0)
  for c in ("cats", "dogs"):
    (root / c).mkdir(parents=True)
    for i in range(25):
      Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
  if corrupt:
    (root / "cats" / "03.png").write_bytes(b"not an image")
  return root


def test_image_folder_classes_holdout_and_corrupt_files(tmp_path, caplog):
  root = _folder(tmp_path / "imgs", corrupt=True)
  train, val = sources.ImageFolderSource(str(root), "train"), sources.ImageFolderSource(str(root), "validation")
  assert train.classes == ["cats", "dogs"] and len(train) + len(val) == 50 and len(val) == 3
  p = pipeline.Pipeline(train, _crops, len(train), seed=0, shuffle=False, prefetch=0)
  with caplog.at_level(logging.WARNING):
    batch = p.batch(0)
  assert batch["image"].shape == (len(train), 16, 16, 3)
  assert p.skipped == 1 and "Skipping an undecodable example" in caplog.text and "03.png" in caplog.text


def test_image_folder_split_subfolders_and_errors(tmp_path):
  _folder(tmp_path / "ds" / "train")
  _folder(tmp_path / "ds" / "validation")
  assert len(sources.ImageFolderSource(str(tmp_path / "ds"), "validation")) == 50
  with pytest.raises(sources.DataError, match="does not exist"):
    sources.ImageFolderSource(str(tmp_path / "missing"), "train")
  (tmp_path / "empty" / "a").mkdir(parents=True)
  with pytest.raises(sources.DataError, match="has no images"):
    sources.ImageFolderSource(str(tmp_path / "empty"), "train")


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A three-class tfds dataset built locally (no download)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(12), "validation": self._generate_examples(4)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {"image": rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), "label": i % 3}


def test_tfds_source_reads_a_prepared_dataset_and_names_bad_ones(tmp_path):
  TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = toy_config(**{"data.name": "tfds", "data.tfds_name": "tiny_images", "data.data_dir": str(tmp_path)})
  p = pipeline.build_pipeline(cfg, "train", train=True, batch_size=4)
  assert len(p.source) == 12 and p.source.num_classes == 3
  assert p.batch(0)["image"].shape == (4, 16, 16, 3)
  with pytest.raises(sources.DataError, match="no split 'test'"):
    sources.TfdsSource("tiny_images", "test", data_dir=str(tmp_path))
  with pytest.raises(sources.DataError, match="'no_such_dataset_xyz' is not known"):
    sources.TfdsSource("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
  with pytest.raises(sources.DataError, match="is not prepared"):
    sources.TfdsSource("mnist", "train", data_dir=str(tmp_path))


def test_transforms_shapes_ranges_and_determinism():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 255, (300, 451, 3), dtype=np.uint8)
  for name, fn in transforms.TRANSFORMS.items():
    out = fn(img, 64, np.random.default_rng(1))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8, name
    np.testing.assert_array_equal(out, fn(img, 64, np.random.default_rng(1)))
  # Center crop of an image already at the target size is the image itself.
  small = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.center_crop(small, 32), small)
  np.testing.assert_allclose(transforms.to_float(small), small / 127.5 - 1.0, atol=1e-6)
  # The tokenizer transform flips about half of the time.
  flipped = small[:, ::-1]
  flips = sum(np.array_equal(transforms.resize_crop_flip(small, 32, np.random.default_rng(s)), flipped)
              for s in range(200))
  assert 60 < flips < 140


def _code_shards(root, rows=(4, 4, 2), h=2, d=3):
  """Shards as tools/extract writes them (no meta.json: sizes come from the shards)."""
  from ifsq_jax.data import code_shards  # pylint: disable=g-import-not-at-top
  root.mkdir()
  rng = np.random.default_rng(0)
  start = 0
  for i, n in enumerate(rows):
    codes = rng.uniform(-1, 1, (n, h, h, d)).astype(np.float16)
    indices = rng.integers(0, 100, (n, h, h)).astype(np.int32)
    code_shards.write_shard(root, i, len(rows), dict(
        codes=codes, codes_flip=codes[:, :, ::-1], indices=indices, indices_flip=indices[:, :, ::-1],
        labels=np.arange(start, start + n, dtype=np.int32), index=np.arange(start, start + n)))
    start += n
  return root


def test_extracted_codes_batch_with_random_flips_and_resume_exactly(tmp_path):
  from ifsq_jax.data import code_shards  # pylint: disable=g-import-not-at-top
  src = code_shards.CodeShardSource(str(_code_shards(tmp_path / "codes")))
  assert len(src) == 10
  p = pipeline.Pipeline(src, pipeline.code_example(flip=True), 4, seed=1, prefetch=0)
  batch = p.batch(0)
  assert batch["codes"].shape == (4, 2, 2, 3) and batch["indices"].shape == (4, 2, 2) and batch["label"].shape == (4,)
  flips = []
  for step in range(10):  # 40 examples: each is its stored codes or their flip, chosen per example
    b = p.batch(step)
    for codes, label in zip(b["codes"], b["label"]):
      plain, flipped = src[int(label)]["codes"], src[int(label)]["codes_flip"]
      assert np.array_equal(codes, plain) or np.array_equal(codes, flipped)
      flips.append(not np.array_equal(codes, plain))
  assert 5 < sum(flips) < 35
  no_flip = pipeline.Pipeline(src, pipeline.code_example(flip=False), 10, seed=1, shuffle=False, prefetch=0).batch(0)
  np.testing.assert_array_equal(no_flip["label"], np.arange(10))
  np.testing.assert_array_equal(no_flip["indices"][7], src[7]["indices"])
  for _ in range(3):
    next(p)
  q = pipeline.Pipeline(src, pipeline.code_example(flip=True), 4, seed=1, prefetch=0)
  q.restore(p.state())
  np.testing.assert_array_equal(next(q)["codes"], next(p)["codes"])


def _jpeg_folder(root, sizes=((500, 375), (375, 500), (640, 480), (1600, 1200)), count=24, corrupt=True):
  """Textured JPEGs (quality 90) in two classes; one truncated file with ``corrupt``."""
  rng = np.random.default_rng(0)
  for i in range(count):
    w, h = sizes[i % len(sizes)]
    coarse = rng.integers(0, 255, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)).astype(np.int16)
    image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / f"c{i % 2}" / f"{i:03d}.jpg", quality=90)
  if corrupt:
    path = root / "c0" / "004.jpg"
    path.write_bytes(path.read_bytes()[:2000])  # a truncated JPEG: the header opens, the pixels do not decode
  return root


def test_worker_processes_give_the_batches_of_one_thread(tmp_path):
  src = sources.ImageFolderSource(str(_jpeg_folder(tmp_path / "jpegs")), "train")
  example = pipeline.image_example(transforms.adm_random_crop_flip, 32)
  one = pipeline.Pipeline(src, example, 8, seed=3, prefetch=0)
  two = pipeline.Pipeline(src, example, 8, seed=3, prefetch=2, workers=2)
  try:
    assert two.workers == 2
    for step in (0, 1, 2, 5):
      a, b = one.batch(step), two.get(step)
      assert a["image"].dtype == np.uint8 and a["image"].shape == (8, 32, 32, 3)
      np.testing.assert_array_equal(b["image"], a["image"])
      np.testing.assert_array_equal(b["label"], a["label"])
    # The truncated JPEG is read in every epoch (22 images, 8 per step): replaced, and counted the same way.
    assert one.skipped == two.skipped >= 1
    assert two.state(next_step=3)["skipped"] <= two.skipped
  finally:
    two.close()


def test_examples_are_picklable_for_worker_processes():
  import pickle  # pylint: disable=g-import-not-at-top
  for fn in (pipeline.image_example(transforms.resize_crop_flip, 16), pipeline.code_example(True, ("codes",), {
      "codes": np.float32})):
    assert pickle.loads(pickle.dumps(fn)) == fn
  assert pipeline.auto_workers(-1) >= 1 and pipeline.auto_workers(3) == 3


def test_reduced_jpeg_decoding_and_crop_resampling_keep_the_transforms_meaning(tmp_path):
  """Opened JPEGs are decoded at ADM's halved scale and only the crop is resampled; the crops barely change."""
  root = _jpeg_folder(tmp_path / "jpegs", sizes=((1600, 1200),), count=2, corrupt=False)
  src = sources.ImageFolderSource(str(root), "train")
  opened, _ = src.open(0)
  decoded, _ = src[0]
  assert opened.size == (1600, 1200) and decoded.shape == (1200, 1600, 3)
  for fn in (transforms.adm_random_crop, transforms.resize_crop_flip):
    for seed in range(3):
      fast = fn(src.open(0)[0], 64, np.random.default_rng(seed)).astype(np.float32)
      full = fn(decoded, 64, np.random.default_rng(seed)).astype(np.float32)
      assert np.abs(fast - full).mean() < 3.0, fn.__name__  # DCT scaling vs box halving, on 0..255
  # Evaluation crops are ADM's exactly, opened or decoded.
  np.testing.assert_array_equal(transforms.center_crop(src.open(0)[0], 64), transforms.center_crop(decoded, 64))


def test_crop_window_resampling_matches_resize_then_crop():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(img).resize((500, 375), Image.BOX))
  pil = Image.fromarray(img)
  for resample, resized in ((Image.BILINEAR, (341, 256)), (Image.BICUBIC, (427, 320))):
    whole = np.asarray(pil.resize(resized, resample=resample)).astype(int)
    for top, left in ((0, 0), (resized[1] - 256, resized[0] - 256), (resized[1] - 256, 40)):
      window = transforms._crop_resized(pil, resized, 256, top, left, resample)  # pylint: disable=protected-access
      diff = np.abs(window.astype(int) - whole[top:top + 256, left:left + 256])
      assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_tfds_dataset_is_prepared_by_process_zero_while_the_others_wait(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from ifsq_jax import multihost  # pylint: disable=g-import-not-at-top
  manual = tmp_path / "manual"
  manual.mkdir()
  barriers = []
  monkeypatch.setattr(multihost, "barrier", lambda tag, timeout_s=0: barriers.append(tag))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with pytest.raises(sources.DataError, match="is not prepared"):  # process 1 prepares nothing, waits, finds nothing
    sources.TfdsSource("tiny_images", "train", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert len(barriers) == 1 and not (tmp_path / "tfds" / "tiny_images").exists()
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  src = sources.TfdsSource("tiny_images", "train", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert len(src) == 12 and len(barriers) == 2
  assert isinstance(src.open(0)[0], Image.Image) and src[0][0].shape == (20, 24, 3)
  with pytest.raises(sources.DataError, match="gcsfuse"):
    sources.TfdsSource("tiny_images", "train", data_dir="gs://bucket/tfds")


@pytest.mark.parametrize("name", ["dit_l2", "llamagen_l", "ifsq_f16_d4"])
def test_paper_configs_read_imagenet_and_stop_before_any_work_without_it(name, tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from ifsq_jax import config_lib  # pylint: disable=g-import-not-at-top
  from ifsq_jax.train import loop, registry  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert (c.data.name, c.data.tfds_name, c.data.workers) == ("tfds", "imagenet2012", -1)
  quick = module.get_config("quickstart" if name != "ifsq_f16_d4" else "tiny")
  assert quick.data.name == "embedded" and quick.data.workers == 0
  c.data.data_dir = str(tmp_path / "tfds")  # holds no prepared ImageNet
  if name != "ifsq_f16_d4":
    c.tokenizer = "configs/ifsq_f16_d4.py"
  task = registry.get(c.task)
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.data_dir=.*config\.data\.manual_dir"):
    loop.run(task.TRAINER, c, tmp_path / "run", schema=task.default_config())
  assert not (tmp_path / "run").exists()
