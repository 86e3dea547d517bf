# Session 13, this CPU: greedy score of RL checkpoints of cpu_run_b.sh on libero_spatial/0's 50 fixed initial states.
for u in ${UPDATES:-65 30}; do
    python accerl.py --task libero_spatial/0 --eval-only --checkpoint runs/s13_libero/rl/checkpoints/update_$(printf %07d $u) \
        --num-eval-workers 2 --run-dir runs/s13_libero/eval_rl_$u
done
