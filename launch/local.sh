#!/usr/bin/env bash
# Train on this machine, its GPUs or its CPU, with the same configs as the TPU pods.
#
#   launch/local.sh [--cpu[=N]] [--gpus=LIST] CONFIG WORKDIR [TRAIN FLAGS ...]
#   launch/local.sh configs/demo.py /tmp/bit_demo
#   launch/local.sh --gpus=0,1 configs/bit_s.py:R50x1 /data/runs/bit_s --config.batch_split=4
#   launch/local.sh --cpu=8 configs/demo.py /tmp/bit_fsdp --config.state_sharding=fsdp
#
# Runs `python -m big_transfer.train --config=CONFIG --workdir=WORKDIR [TRAIN FLAGS]` (any
# --config.key=value override) on the devices JAX finds: the GPUs of this host when JAX's CUDA
# build is installed (pip install "jax[cuda12]==0.10.2"), else the CPU. Rerun to resume.
#   --cpu[=N]    use the CPU even where there is a GPU, as N devices (default 1): rehearses a
#                multi-device config (the batch split over devices, FSDP) on a laptop.
#   --gpus=LIST  only these GPUs (CUDA_VISIBLE_DEVICES), e.g. --gpus=0 next to another job.
#
# GPU memory: JAX reserves 75% of each GPU's memory when it starts (JAX's "GPU memory
# allocation" notes). Export XLA_PYTHON_CLIENT_MEM_FRACTION=.95 to give a run that has the GPU to
# itself more, or XLA_PYTHON_CLIENT_PREALLOCATE=false to allocate on demand next to other
# processes (slower, and memory fragments). TensorFlow only reads the data here and is the CPU
# build (tensorflow-cpu), so it takes no GPU memory. Out of memory: see the planner
# (python -m big_transfer.plan --config=... plans for the local GPUs) and --config.batch_split.
set -euo pipefail

usage="usage: launch/local.sh [--cpu[=N]] [--gpus=LIST] CONFIG WORKDIR [TRAIN FLAGS ...]"
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --cpu) cpu=1 ;;
    --cpu=*) cpu=${1#--cpu=} ;;
    --gpus=*) export CUDA_VISIBLE_DEVICES=${1#--gpus=} ;;
    *) echo "error: unknown option $1; $usage" >&2; exit 1 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then
  echo "error: CONFIG and WORKDIR are required; $usage" >&2
  exit 1
fi
if [[ -n ${cpu:-} ]]; then
  if ! [[ $cpu =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --cpu=$cpu is not a device count; use --cpu or --cpu=N with N >= 1." >&2
    exit 1
  fi
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$cpu"
fi
config=$1 workdir=$2
shift 2
exec python -m big_transfer.train --config="$config" --workdir="$workdir" "$@"
