#!/usr/bin/env bash
# Container entrypoint (tini is PID 1). One process: exec the job itself, so SIGTERM reaches it
# with no launcher in between. Several processes or machines: exec accelerate launch.
set -euo pipefail

processes="${SDFT_NUM_PROCESSES:-1}"
machines="${SDFT_NUM_MACHINES:-1}"

if (( processes > 1 || machines > 1 )); then
  # accelerate counts processes over all machines; SDFT_NUM_PROCESSES is per machine.
  # --multi_gpu picks accelerate's torchrun launcher (gloo on a machine without GPUs).
  exec accelerate launch --multi_gpu \
    --num_processes "$(( processes * machines ))" \
    --num_machines "${machines}" \
    --machine_rank "${SDFT_MACHINE_RANK:-0}" \
    --main_process_ip "${SDFT_MAIN_PROCESS_IP:-127.0.0.1}" \
    --main_process_port "${SDFT_MAIN_PROCESS_PORT:-29500}" \
    -m job "$@"
fi
exec python -m job "$@"
