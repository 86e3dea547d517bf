# Session 14: the keypoint + proprio VLA with hindsight relabelling, 7 settings side by side on a GPU host's CPU,
# each pinned to 2 cores (benchmarks/parallel_cpu_runs.py), 480 s each. From the repo root: OUT=<dir> bash <this>
python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl; export PYTHONPATH=/tmp/py:$PWD
nproc; lscpu | grep "Model name"
C="--policy.image-size 64 --policy.vision-tower resnet --policy.instruction-film --policy.decoder-init-std 0.0625 --policy.embedding-init-std 0.3 --policy.keypoints 16 --policy.proprio-dim 3 --policy-lr 1e-3 --ent-coef 0.01 --hindsight-relabel --final-eval-episodes 40 --eval-every-updates 20 --checkpoint-every-updates 100000"
timeout 575 python benchmarks/parallel_cpu_runs.py --seconds 480 --out-dir /tmp/sw --common "$C" \
  --config mb16="--num-minibatches 16" \
  --config mb4="--num-minibatches 4" \
  --config mb8="--num-minibatches 8" \
  --config mb16_lr3e-4="--num-minibatches 16 --policy-lr 3e-4" \
  --config mb16_ent0.003="--num-minibatches 16 --ent-coef 0.003" \
  --config mb16_kl0="--num-minibatches 16 --kl-coef 0" \
  --config mb16_nokp="--num-minibatches 16 --policy.keypoints 0" 2>&1 | grep -v "^{"
mkdir -p $OUT/sw; cp /tmp/sw/*.log /tmp/sw/sweep.json $OUT/sw/; for d in /tmp/sw/*/; do n=$(basename $d); mkdir -p $OUT/sw/$n; cp $d/summary.json $OUT/sw/$n/ 2>/dev/null; done
