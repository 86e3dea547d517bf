python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl; export PYTHONPATH=/tmp/py:$PWD
nproc; lscpu | grep "Model name"
C="--policy.image-size 64 --policy.vision-tower resnet --policy.instruction-film --policy.decoder-init-std 0.0625 --policy.embedding-init-std 0.3 --final-eval-episodes 40 --eval-every-updates 20 --checkpoint-every-updates 100000"
timeout 580 python benchmarks/parallel_cpu_runs.py --seconds 480 --out-dir /tmp/sw1 --common "$C" \
  --config base= \
  --config lr1e-3_mb16="--policy-lr 1e-3 --num-minibatches 16" \
  --config lr1e-3_mb16_e003="--policy-lr 1e-3 --num-minibatches 16 --ent-coef 0.003" \
  --config lr1e-3_mb16_e001="--policy-lr 1e-3 --num-minibatches 16 --ent-coef 0.001" \
  --config lr3e-3_mb16="--policy-lr 3e-3 --num-minibatches 16" \
  --config lr1e-3_mb16_ep2="--policy-lr 1e-3 --num-minibatches 16 --update-epochs 2" \
  --config lr1e-3_mb16_seg8="--policy-lr 1e-3 --num-minibatches 16 --segments-per-update 8" \
  --config lr1e-3_mb16_head01_e003="--policy-lr 1e-3 --num-minibatches 16 --ent-coef 0.003 --policy.action-head-init-scale 0.1" 2>&1 | grep -v "^{"
mkdir -p $OUT/sw1; cp /tmp/sw1/*.log /tmp/sw1/sweep.json $OUT/sw1/; for d in /tmp/sw1/*/; do n=$(basename $d); mkdir -p $OUT/sw1/$n; cp $d/events* $d/summary.json $OUT/sw1/$n/ 2>/dev/null; done
