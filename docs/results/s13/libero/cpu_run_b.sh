# Session 13, this 2-core CPU, second RL arm (the first, cpu_run.sh with 4 epochs x 4 minibatches of 32 rows at
# lr 1e-4, raised the per-token entropy 3.28 -> 3.77 and let training success fall 0.65 -> 0.40 in 16 updates; it
# was stopped): RL from the same SFT policy with 2 optimiser steps per update at lr 5e-5.
set -uo pipefail
out=runs/s13_libero
python accerl.py --task libero_spatial/0 --init-policy $out/sft/policy --max-seconds ${RL_SECONDS:-2700} \
    --total-env-steps 100000000 --policy-lr 5e-5 --num-env-workers 2 --envs-per-worker 2 --num-eval-workers 0 \
    --final-eval-episodes 0 --segments-per-update 4 --segment-len 32 --update-epochs 1 --num-minibatches 2 \
    --critic-warmup-updates 2 --checkpoint-every-updates 10 --keep-checkpoints 1000 --log-every-s 60 --run-dir $out/rl
