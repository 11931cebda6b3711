"""PyTorch checkpoint -> params converters, one key table each over one engine (:mod:`ifsq_jax.convert.engine`).

``python -m ifsq_jax.convert {dinov2,dit,inception,llamagen,tokenizer,vgg16} --checkpoint FILE --out DIR``.
"""
