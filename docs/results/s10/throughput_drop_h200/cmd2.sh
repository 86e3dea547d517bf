# The same as cmd.sh with sync long enough for several lockstep rounds, its rate over whole rounds
# (first update to last), async shorter (it is continuous).
python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/py:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; lscpu | grep "Model name"
python benchmarks/throughput.py --seconds 130 --sync-seconds 320 --ceiling-seconds 20 --num-env-workers 14 \
  --envs-per-worker 2 --step-cost-ms 20 --env-options '{"reset_cost_ms": 300}' --image-size 224 --device cuda \
  --when-learner-behind drop-oldest --out $OUT/throughput_large_14x2_drop_long_sync.json \
  -- --policy.preset large --update-epochs 4 --num-minibatches 4 --micro-batch-size 64 2>&1 | grep -v "^\s*$" | tail -40
