#!/usr/bin/env bash
# Container entrypoint (tini is PID 1). One process: exec the job itself, so SIGTERM reaches it
# with no launcher in between. Several processes or machines: accelerate launch.
set -euo pipefail

processes="${SDFT_NUM_PROCESSES:-1}"
machines="${SDFT_NUM_MACHINES:-1}"

if (( processes == 1 && machines == 1 )); then
  exec python -m job "$@"
fi

# Why not exec here: accelerate launch exits 1 when any rank fails, also when every rank saved a
# checkpoint after SIGTERM and exited 143, which the Job must retry as a preemption, not count as a
# failure. Each rank writes its exit code into this folder; 143 replaces the launcher's status only
# when all of this machine's ranks exited 143.
ENTRYPOINT_RANK_EXIT_DIR="$(mktemp -d)"
export ENTRYPOINT_RANK_EXIT_DIR
# After SIGTERM the launcher gives the ranks this long to upload their checkpoint before SIGKILL
# (torch's default, 30 s, is too short for a model's); the pod's grace period is the real bound.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-3600}"

# accelerate counts processes over all machines; SDFT_NUM_PROCESSES is per machine.
# --multi_gpu picks accelerate's torchrun launcher (gloo on a machine without GPUs).
accelerate launch --multi_gpu \
  --num_processes "$(( processes * machines ))" \
  --num_machines "${machines}" \
  --machine_rank "${SDFT_MACHINE_RANK:-0}" \
  --main_process_ip "${SDFT_MAIN_PROCESS_IP:-127.0.0.1}" \
  --main_process_port "${SDFT_MAIN_PROCESS_PORT:-29500}" \
  -m job "$@" &
launcher=$!
interrupted=0
trap 'interrupted=1; kill -TERM "${launcher}" 2>/dev/null || true' TERM INT
while true; do  # a trapped signal ends `wait` early: wait again until the launcher itself has exited
  interrupted=0
  status=0
  wait "${launcher}" || status=$?
  (( interrupted )) || break
done

preempted=0
for rank in "${ENTRYPOINT_RANK_EXIT_DIR}"/rank-*; do
  if [[ -f "${rank}" && "$(<"${rank}")" == 143 ]]; then
    preempted=$(( preempted + 1 ))
  fi
done
rm -rf "${ENTRYPOINT_RANK_EXIT_DIR}"
if (( status != 0 && preempted == processes )); then
  status=143
fi
exit "${status}"
