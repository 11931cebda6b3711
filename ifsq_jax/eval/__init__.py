"""Evaluation metrics: PSNR, SSIM, Frechet distances and feature statistics, ADM's generative metrics, CKNNA.

``from ifsq_jax import eval as ev``; ``ev.psnr(a, b, data_range=1.0)`` and
``ev.ssim(a, b, data_range=1.0)`` on NHWC float batches (one value per image),
``ev.frechet_distance(mu1, sigma1, mu2, sigma2)``, ``ev.cknna(feats_a, feats_b, topk=10)``.
``ev.FeatureExtractor(inception_dir)`` turns uint8 images into the features of
FID, sFID, the Inception Score and precision / recall
(``ev.inception_score``, ``ev.precision_recall``); both ``python -m
ifsq_jax.tools.fid`` and the in-training evaluation use these.
"""

from ifsq_jax.eval.cknna import cknna, hsic_unbiased
from ifsq_jax.eval.fid import (FeatureStats, fd_vgg16, frechet_distance, load_stats, save_samples_npz, to_uint8,
                               vgg16_features)
from ifsq_jax.eval.features import FeatureExtractor, generative_metrics, summarize
from ifsq_jax.eval.generative import inception_score, inception_score_split, precision_recall
from ifsq_jax.eval.image_metrics import psnr, ssim
