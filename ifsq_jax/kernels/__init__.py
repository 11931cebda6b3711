"""Backend-specific kernels, fenced off from the models.

``cpu/``: what makes XLA's CPU backend train the tokenizer at a usable speed
(oneDNN convolutions through the XLA FFI, the matmul kernel gradient of XLA's
convolution, the host-memory settings). The models never import a backend's
kernels directly: they choose a convolution by the visible ``impl`` field of
:func:`ifsq_jax.models.conv.conv2d` / :class:`ifsq_jax.models.conv.Conv`.
"""
