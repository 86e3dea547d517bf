python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl; export PYTHONPATH=/tmp/py:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep "Model name"
set -x
M="--model.image-size 64 --model.channels 16 32 32 --model.reward-channels 16 32 32 --model.reward-hidden 128"
time python world_model.py collect --episodes 250 --image-size 64 --seed 1 --out /tmp/wm_data 2>&1 | tail -3
time python world_model.py collect --episodes 10 --image-size 64 --seed 2 --out /tmp/wm_test 2>&1 | tail -3
python world_model.py train --data /tmp/wm_data $M --device cuda --max-minutes 5 --batch-size 64 --log-every-updates 500 --out $OUT/world_model --run-dir /tmp/wm_run 2>&1 | tail -25
python benchmarks/wm_quality.py --checkpoint $OUT/world_model --test-data /tmp/wm_test --device cuda --throughput 2>&1 | tail -25
