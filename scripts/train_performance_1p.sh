#!/usr/bin/env bash
# Throughput run on one device (Ascend NPU, GPU or CPU), Ascend ModelZoo style:
#   bash scripts/train_performance_1p.sh --data_path=/data/faces_emore [--output_path=DIR]
#        [--batch_size=128] [--steps=100] [--backbone=iresnet50] [--precision=mixed_float16]
# Runs `faceid train` for one epoch capped at --steps steps, without verification, tees the log to
# <output_path>/train_<ASCEND_DEVICE_ID>.log and prints the ModelZoo result lines.
set -uo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "${script_dir}/modelzoo_common.sh"

mode="performance"
train_epochs=1
batch_size=128
steps=100
parse_modelzoo_args "$@"
run_faceid_train --train_epochs "${train_epochs}" --steps "${steps}" --targets none
