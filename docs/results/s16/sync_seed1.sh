# Session 16, this 2-core CPU: the main command in sync mode (the same parts in lockstep), seed 1, 20 minutes,
# against the async seed-1 run of default_seeds.sh. Log: docs/results/s16/sync_seed1.log
python accerl.py --mode sync --seed 1 --run-dir runs/s16_sync_seed1 > docs/results/s16/sync_seed1.log 2>&1
