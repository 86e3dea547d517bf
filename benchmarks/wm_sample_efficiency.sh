#!/bin/bash
# Issue 5's sample-efficiency experiment on tabletop2d: real env steps to reach 80 % greedy success, model-free
# vs with a world model (pre-trained on 1,000 trajectories of a weak policy, then trained online), same seeds.
#   bash benchmarks/wm_sample_efficiency.sh                                   # GPU machine, 3 seeds each
#   SEEDS="1" STEPS=200000 DEVICE=cpu ENV_WORKERS=1 IMAGINATION_WORKERS=1 bash benchmarks/wm_sample_efficiency.sh
#   EXTRA="--init-policy runs/sft/policy" bash benchmarks/wm_sample_efficiency.sh   # both arms from a warm start
#   DEFAULTS=--no-task-defaults bash benchmarks/wm_sample_efficiency.sh   # the plain policy (sessions 9-11's runs)
# Both arms train tabletop2d's default policy from random init (TABLETOP2D_DEFAULTS: it reads proprio, which the
# world model predicts) with STEPS real env steps as the budget (no time limit).
# Writes $OUT/{world_model,wm_train,model_free_<seed>,with_wm_<seed>}, docs/wm_sample_efficiency.png, and prints
# per run the real env step from which greedy success reached 80 % in 3 evaluations in a row
# (benchmarks/learning_curve.py --sustain 3).
# Steps already done (data, world model, a run with a summary.json) are skipped on a second call.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/wm_se}
SEEDS=${SEEDS:-"1 2 3"}
STEPS=${STEPS:-1000000}                   # real env steps per run (the x axis and the budget)
SIZE=${SIZE:-64}                          # frame side of the policy and the world model
DEVICE=${DEVICE:-auto}
DATA=${DATA:-demos/wm_tabletop2d_$SIZE}
EPISODES=${EPISODES:-250}                 # weak-policy trajectories per task (4 tasks: 1,000)
PNG=${PNG:-docs/wm_sample_efficiency.png}
EXTRA=${EXTRA:-}                          # more accerl.py flags for both arms
WM_EXTRA=${WM_EXTRA:-}                    # more accerl.py flags for the world-model arm
DEFAULTS=${DEFAULTS:-}                    # --no-task-defaults: the plain policy and update instead
COMMON="$DEFAULTS --task tabletop2d --policy.image-size $SIZE --device $DEVICE --total-env-steps $STEPS --max-seconds 0
        --num-env-workers ${ENV_WORKERS:-8} --envs-per-worker ${ENVS_PER_WORKER:-4} --eval-every-updates 10
        --eval-episodes 40 --final-eval-episodes 200 --checkpoint-every-updates 200 $EXTRA"

# 1. 1,000 weak-policy trajectories (the scripted mix of world_model.py collect: ~60 % success, 250 per task),
#    then offline training of the denoiser and the reward model
[ -d "$DATA" ] || python world_model.py collect --episodes "$EPISODES" --image-size "$SIZE" --out "$DATA" --seed 1
[ -f "$OUT/world_model/model.safetensors" ] || python world_model.py train --data "$DATA" --model.image-size "$SIZE" \
    --run-dir "$OUT/wm_train" --out "$OUT/world_model" --device "$DEVICE" --max-minutes "${WM_MINUTES:-60}"

# 2. the same seeds without and with the world model (imagined segments: half of each super batch; the world
#    model keeps training on the replay of real steps every 5 updates)
for seed in $SEEDS; do
  [ -f "$OUT/model_free_$seed/summary.json" ] || python accerl.py $COMMON --seed "$seed" --exp-name model_free \
      --run-dir "$OUT/model_free_$seed"
  [ -f "$OUT/with_wm_$seed/summary.json" ] || python accerl.py $COMMON --seed "$seed" --exp-name with_wm \
      --run-dir "$OUT/with_wm_$seed" --wm-checkpoint "$OUT/world_model" \
      --num-imagination-workers "${IMAGINATION_WORKERS:-4}" --imagined-envs-per-worker 4 --imagine-horizon 4 \
      --imagined-share 0.5 --wm-train-every-updates 5 --wm-train-steps 4 $WM_EXTRA
done

# 3. greedy success against real env steps, both arms in one PNG; steps to 80 % per run
runs=(); labels=()
for seed in $SEEDS; do runs+=("$OUT/model_free_$seed"); labels+=("model-free_s$seed"); done
for seed in $SEEDS; do runs+=("$OUT/with_wm_$seed"); labels+=("world-model_s$seed"); done
python benchmarks/learning_curve.py "${runs[@]}" --labels "${labels[@]}" --threshold 0.8 --sustain 3 \
    --title "tabletop2d: greedy success vs real env steps" --out "$PNG"
