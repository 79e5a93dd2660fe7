#!/usr/bin/env bash
# Train, farcast, resume, as a batch job: train EVERY steps, then farcast HORIZON steps past the newest
# checkpoint and resume training from the forecast where the backtest says it beats the last checkpoint.
#
#   bash examples/farcast_job.sh TRAIN_SCRIPT RUN_DIR TOTAL_STEPS EVERY HORIZON
#   bash examples/farcast_job.sh examples/trainer/train.py runs/gpt2 400 100 50
#   sbatch examples/farcast_job.sh examples/pytorch/train.py runs/mlp 600 200 100
#
# TRAIN_SCRIPT takes --run DIR --stop-at STEP and resumes from DIR's newest checkpoint-<step> folder.
# FARCAST_EVAL="python my_eval.py {checkpoint}" gates each jump by your loss instead of weight error.
# FARCAST_SCHEDULE=advance moves the learning-rate schedule on with each jump (default: keep).
#SBATCH --job-name=farcast-loop
#SBATCH --time=04:00:00
set -euo pipefail
script=$1 run=$2 total=$3 every=$4 horizon=$5
python=${PYTHON:-python3}
farcast=${FARCAST:-farcast}

newest() {
    [ -d "$run" ] || { echo 0; return; }
    find "$run" -maxdepth 1 -regex '.*/checkpoint-[0-9]+' | sed 's/.*checkpoint-//' | sort -n | tail -1
}

step=$(newest)
while [ "$step" -lt "$total" ]; do
    stop=$((step + every < total ? step + every : total))
    "$python" "$script" --run "$run" --stop-at "$stop"
    step=$(newest)
    [ "$step" -ge "$total" ] && break
    if [ "$(find "$run" -maxdepth 1 -regex '.*/checkpoint-[0-9]+' | wc -l)" -lt 3 ]; then
        continue
    fi
    set +e
    "$farcast" predict "$run" -H "$horizon" -o "$run/checkpoint-$((step + horizon))" --resumable \
        --schedule "${FARCAST_SCHEDULE:-keep}" --no-fallback --min-skill 0 --quiet ${FARCAST_EVAL:+--eval-cmd "$FARCAST_EVAL"} \
        > "$run/farcast-at-$step.log"
    code=$?
    set -e
    case $code in
        0) echo "step $step: resuming from the forecast of step $((step + horizon))"; step=$((step + horizon)) ;;
        4) echo "step $step: the backtest says the forecast does not beat the last checkpoint; training on" ;;
        *) echo "step $step: farcast failed (exit $code); see $run/farcast-at-$step.log" >&2; exit "$code" ;;
    esac
done
