"""Input pipelines: sources (embedded photos, image folders, tfds), transforms, batching."""

from ifsq_jax.data.pipeline import Pipeline, build_source, build_pipeline
from ifsq_jax.data.sources import DataError
