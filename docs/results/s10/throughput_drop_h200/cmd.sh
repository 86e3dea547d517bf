# Issue 2 throughput on one H200: session 8's learner-bound row (large preset, 224 px, 4 epochs x 4 minibatches,
# 14 x 2 envs, 20 ms lognormal step cost + 300 ms resets) with async's env workers dropping the oldest full
# segment instead of waiting for the learner (--when-learner-behind drop-oldest; sync unchanged).
python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/py:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; lscpu | grep "Model name"
python benchmarks/throughput.py --seconds ${SECONDS_PER_MODE:-120} --ceiling-seconds 30 --num-env-workers 14 \
  --envs-per-worker 2 --step-cost-ms 20 --env-options '{"reset_cost_ms": 300}' --image-size 224 --device cuda \
  --when-learner-behind drop-oldest --out $OUT/throughput_large_14x2_drop.json \
  -- --policy.preset large --update-epochs 4 --num-minibatches 4 --micro-batch-size 64 2>&1 | grep -v "^\s*$" | tail -40
