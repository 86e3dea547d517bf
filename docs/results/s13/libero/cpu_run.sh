# Session 13, this 2-core CPU (no GPU machine was lent): issue 6's experiment on libero_spatial/0 end to end here.
# 1. greedy score of the SFT policy (sft_cpu.sh) on the task's 50 fixed initial states;
# 2. RL from it for RL_SECONDS (2 env workers x 2 envs, chunk-end rendering), checkpoints every 10 updates (stopped by
#    SIGINT after 16 updates: see cpu_run_b.sh).
set -uo pipefail
out=runs/s13_libero
python accerl.py --task libero_spatial/0 --eval-only --init-policy $out/sft/policy --num-eval-workers 2 \
    --run-dir $out/eval_sft
python accerl.py --task libero_spatial/0 --init-policy $out/sft/policy --max-seconds ${RL_SECONDS:-3300} \
    --total-env-steps 100000000 --policy-lr 1e-4 --num-env-workers 2 --envs-per-worker 2 --num-eval-workers 0 \
    --final-eval-episodes 0 --segments-per-update 4 --segment-len 32 --update-epochs 4 --num-minibatches 4 \
    --critic-warmup-updates 2 --checkpoint-every-updates 10 --keep-checkpoints 1000 --log-every-s 60 --run-dir $out/rl
