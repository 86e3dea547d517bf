# The rl_probe sweep of session 7 (docs/RESULTS.md): 14 settings of the objects probe side by side, one core each,
# 500 updates or 470 s each. On a 16-core machine, from the repo root: OUT=<dir> bash benchmarks/rl_probe_sweep.sh
# (the pip line installs tyro from a carried .bundle where the machine lacks it; harmless elsewhere).
set -u; mkdir -p "$OUT"
[ -d .bundle ] && pip install -q --no-index --no-deps --target /tmp/py .bundle/tyro-*.whl \
    .bundle/docstring_parser-*.whl .bundle/typeguard-*.whl .bundle/extra/typing_extensions-*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/py:$PWD OMP_NUM_THREADS=1
P="timeout 470 python benchmarks/rl_probe.py --obs objects --eval-every 25 --updates 500"
while read -r name flags; do
  $P $flags > $OUT/$name.log 2>&1 &
done <<'LIST'
relu_lr1e-3 --trunk relu --lr 1e-3
relu_lr3e-4 --trunk relu --lr 3e-4
relu_lr3e-4_ent0.01 --trunk relu --lr 3e-4 --ent-coef 0.01
relu_lr1e-3_ent0.01 --trunk relu --lr 1e-3 --ent-coef 0.01
relu_lr1e-3_ent0.03 --trunk relu --lr 1e-3 --ent-coef 0.03
relu_lr3e-4_ent0.03 --trunk relu --lr 3e-4 --ent-coef 0.03
relu_lr1e-3_ent0.01_ignore --trunk relu --lr 1e-3 --ent-coef 0.01 --env-options {"wrong_grasp":"ignore"}
relu_lr1e-3_chunk4 --trunk relu --lr 1e-3 --chunk-len 4
relu_lr1e-3_bins32 --trunk relu --lr 1e-3 --num-bins 32
relu_lr1e-3_ent0.01_envs64 --trunk relu --lr 1e-3 --ent-coef 0.01 --num-envs 64
relu_lr1e-3_ppoclip --trunk relu --lr 1e-3 --loss ppo-clip
tanh_lr3e-4_ent0.01 --trunk tanh --ent-coef 0.01
relu_lr1e-3_fixed --trunk relu --lr 1e-3 --env-options {"layout":"fixed"}
relu_lr1e-3_seed1 --trunk relu --lr 1e-3 --seed 1
LIST
wait
lscpu | grep "Model name"; for f in $OUT/*.log; do echo "== $(basename $f)"; tail -n 3 $f; done
