#!/usr/bin/env bash
# Full training on one device (Ascend NPU, GPU or CPU), Ascend ModelZoo style:
#   bash scripts/train_full_1p.sh --data_path=/data/faces_emore [--output_path=DIR] [--batch_size=128]
#        [--train_epochs=20] [--backbone=iresnet50] [--precision=mixed_float16] [--any_train_flag=VALUE]
# Runs `faceid train` over all epochs with verification after each, tees the log to
# <output_path>/train_<ASCEND_DEVICE_ID>.log and prints the ModelZoo result lines.
set -uo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "${script_dir}/modelzoo_common.sh"

mode="full"
train_epochs=20
batch_size=128
targets="lfw,cfp_fp,agedb_30"
parse_modelzoo_args "$@"
run_faceid_train --train_epochs "${train_epochs}" --targets "${targets}"
