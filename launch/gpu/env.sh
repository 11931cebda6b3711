# shellcheck shell=bash
# XLA and NCCL settings for training on NVIDIA GPUs, sourced by host.sh and slurm.sbatch.
#
# Sets the array gpu_env (NAME=value words for `env`). A variable already in the
# environment wins, and flags of an XLA_FLAGS you set come after these, so they win too
# (XLA keeps the last value of a flag given twice).

gpu_xla_flags=(
  # Off in XLA by default. Lets XLA schedule the gradient all-reduce (data parallel) and
  # the FSDP all-gathers / reduce-scatters early or late enough to overlap them with
  # compute, instead of each GPU waiting for them where they fall.
  --xla_gpu_enable_latency_hiding_scheduler=true
)
# Left at XLA's default on purpose (measure before changing them):
# * --xla_gpu_enable_triton_gemm (default true): parameters are float32 and the compute
#   bfloat16, so every matmul first casts its weights; Triton GEMMs fuse that cast, which
#   cuBLAS (=false) cannot. Try =false if autotuning makes compilation slow.
# * --xla_gpu_enable_command_buffer (default: fusions, cuBLAS, cuDNN and custom calls run
#   as CUDA graphs): fewer kernel launches, which matters most where kernels are small
#   (small models, LlamaGen's one-token decoding steps). Set it empty (--xla_gpu_enable_command_buffer=) to see
#   each kernel in a profile or to rule the graphs out when chasing a hang.

# shellcheck disable=SC2034  # used by the scripts that source this file
gpu_env=(
  "XLA_FLAGS=${gpu_xla_flags[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
  # JAX takes 75% of GPU memory by default. Training wants more for activations; the
  # last 10% stays outside XLA's pool for cuDNN / cuBLAS workspaces and NCCL buffers.
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
  # A failing or stuck collective prints NCCL's reason instead of nothing. Network
  # settings of a cluster (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) belong in its environment.
  "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
)
