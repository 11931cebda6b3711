"""PyTorch checkpoint -> params converters: ``python -m ifsq_jax.convert {dinov2} --checkpoint FILE --out DIR``."""
