"""Kernels and process settings for XLA's CPU backend.

* :mod:`.onednn` (with ``onednn_conv.cc``): convolutions through oneDNN, called by
  the XLA FFI; built on first use, with a probe that says whether oneDNN can build
  a given convolution on this processor.
* :mod:`.conv_grad`: XLA's convolution with its kernel gradient taken as matmuls.
* :mod:`.host_memory`: XLA's memory-optimised CPU scheduler and glibc settings that
  keep freed memory, set by the command-line entry points.

Nothing here runs at import time; the modules import no accelerator code.
"""
