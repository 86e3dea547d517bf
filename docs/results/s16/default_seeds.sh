# Session 16, this 2-core CPU: the plain main command (tabletop2d's task defaults: TABLETOP2D_DEFAULTS in accerl.py),
# three seeds one after the other, 20 minutes each. Logs: docs/results/s16/default_seed<N>.log
set -u
for seed in 1 2 3; do
    python accerl.py --seed "$seed" --run-dir "runs/s16_default_seed$seed" \
        > "docs/results/s16/default_seed$seed.log" 2>&1
done
