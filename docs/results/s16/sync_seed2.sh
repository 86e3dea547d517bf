# Session 16, this 2-core CPU: the main command in sync mode, seed 2 (after seed 1 did not learn). Log: sync_seed2.log
python accerl.py --mode sync --seed 2 --run-dir runs/s16_sync_seed2 > docs/results/s16/sync_seed2.log 2>&1
