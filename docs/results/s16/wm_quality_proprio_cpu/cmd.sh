python benchmarks/wm_quality.py --minutes 6 --episodes 50 --threads 2 --data-dir /tmp/wmq_data --run-dir runs/s16_wmq
