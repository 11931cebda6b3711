"""Command-line tools (python -m ifsq_jax.tools.<name>)."""
