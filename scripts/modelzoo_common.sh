# Shared by train_full_1p.sh and train_performance_1p.sh (sourced, not run).
# Parses ModelZoo-style --key=value arguments, runs `faceid train`, prints the ModelZoo summary.

repo_root=$(cd "${script_dir}/.." && pwd)
export ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
export RANK_SIZE=${RANK_SIZE:-1}
export RANK_ID=${RANK_ID:-0}
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
python_bin=${PYTHON:-python3}

data_path=""
output_path=""
extra_args=()

parse_modelzoo_args() {
    local arg
    for arg in "$@"; do
        case "${arg}" in
            --data_path=*) data_path="${arg#*=}" ;;
            --output_path=*) output_path="${arg#*=}" ;;
            --train_epochs=*) train_epochs="${arg#*=}" ;;
            --batch_size=*) batch_size="${arg#*=}" ;;
            --steps=*) steps="${arg#*=}" ;;
            --targets=*) targets="${arg#*=}" ;;
            --*=*) extra_args+=("${arg}") ;;
            *) echo "Unknown argument ${arg}: use --key=value" >&2; exit 2 ;;
        esac
    done
    if [[ -z "${data_path}" ]]; then
        echo "--data_path=DIR is required (a tfds data dir or an insightface folder)" >&2
        exit 2
    fi
    output_path=${output_path:-"${repo_root}/test/output/${ASCEND_DEVICE_ID}"}
    mkdir -p "${output_path}"
}

summary_value() {  # summary_value KEY: a value of the last "Final summary:" line of the log
    grep "Final summary:" "${log_file}" | tail -n 1 | tr ' ' '\n' | sed -n "s/^$1=//p"
}

run_faceid_train() {
    log_file="${output_path}/train_${ASCEND_DEVICE_ID}.log"
    echo "Device ${ASCEND_DEVICE_ID} (RANK_SIZE=${RANK_SIZE}), ${mode} run, log: ${log_file}"
    local start_time end_time status
    start_time=$(date +%s)
    "${python_bin}" "${script_dir}/faceid" train --data_path "${data_path}" --model_dir "${output_path}" \
        --batch_size "${batch_size}" "$@" "${extra_args[@]}" 2>&1 | tee "${log_file}"
    status=${PIPESTATUS[0]}
    end_time=$(date +%s)
    if ! grep -q "Final summary:" "${log_file}"; then
        echo "Training failed (exit status ${status}): no final summary in ${log_file}" >&2
        exit "$(( status ? status : 1 ))"
    fi

    local fps accuracy global_batch training_time loss
    fps=$(summary_value images_per_sec)
    global_batch=$(summary_value batch_size)
    loss=$(summary_value loss)
    accuracy=$(summary_value accuracy)
    if [[ "${mode}" == "full" ]]; then
        local verification
        verification=$(summary_value verification_accuracy)
        if [[ -n "${verification}" && "${verification}" != "nan" ]]; then accuracy=${verification}; fi
    fi
    training_time=$(awk -v b="${global_batch}" -v f="${fps}" 'BEGIN { printf "%.2f", (f > 0 ? b * 1000 / f : 0) }')

    echo "------------------ Final result ------------------"
    echo "Final Performance images/sec : ${fps}"
    echo "Final Train Accuracy : ${accuracy}"
    echo "E2E Training Duration sec : $(( end_time - start_time ))"
    echo "BatchSize : ${global_batch}"
    echo "ActualFPS : ${fps}"
    echo "TrainingTime : ${training_time}"
    echo "ActualLoss : ${loss}"
    return "${status}"
}
