#!/bin/bash
# Written by `difftrain-dist cluster slurm` for run @@name: Ray over the allocation, then
# `difftrain-dist train`. USR1 (time limit) or TERM (preemption) makes the run save a checkpoint
# and exit 75; the job then requeues itself and the next start resumes run @@name.
@@sbatch_lines
set -uo pipefail

PYTHON=${DIFFTRAIN_PYTHON:-python}
RAY=${RAY:-ray}
RECIPE=@@recipe
PORT=@@port
mkdir -p @@log_dir

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk '{print $1}')
echo "run @@name: Ray head on $HEAD ($HEAD_IP:$PORT), ${#NODES[@]} node(s), start ${SLURM_RESTART_COUNT:-0}"

srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" \
    "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$PORT" \
    --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus=@@gpus_per_node --block &
sleep "${RAY_START_WAIT:-20}"
for NODE in "${NODES[@]:1}"; do
    srun --overlap --nodes=1 --ntasks=1 -w "$NODE" \
        "$RAY" start --address="$HEAD_IP:$PORT" \
        --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus=@@gpus_per_node --block &
done
sleep "${RAY_START_WAIT:-20}"

@@train &
DRIVER=$!
trap 'echo "USR1: time limit near, run @@name saves a checkpoint"; kill -USR1 "$DRIVER"' USR1
trap 'echo "TERM: preempted, run @@name saves a checkpoint"; kill -TERM "$DRIVER"' TERM
STATUS=0
while kill -0 "$DRIVER" 2>/dev/null; do
    wait "$DRIVER"
    STATUS=$?
done
trap - USR1 TERM

srun --overlap --nodes="${#NODES[@]}" --ntasks="${#NODES[@]}" "$RAY" stop --force
kill $(jobs -p) 2>/dev/null
wait

if [ "$STATUS" -eq 75 ]; then
    echo "run @@name stopped with a checkpoint: requeueing job $SLURM_JOB_ID to resume it"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
