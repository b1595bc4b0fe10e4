#!/usr/bin/env bash
# Train-step images/s on 1, 2, 4, 8 devices (faked CPU devices unless real ones exist).
#   bash benchmarks/scaling.sh configs/mnist.py 32 28,28,1
set -euo pipefail
config=${1:-configs/mnist.py}; batch=${2:-32}; shape=${3:-28,28,1}
for n in 1 2 4 8; do
  XLA_FLAGS=--xla_force_host_platform_device_count=$n NPROC=16 \
    python "$(dirname "$0")/train_step.py" --config="$config" --batch_size="$batch" --image_shape="$shape" --repeats=10
done
