# Session 14: hindsight instruction relabelling (`rl_probe.py --relabel`) against the same probes without it, one
# core each, 500 updates (~1 M env steps) or 540 s. On a 16-core machine, from the repo root:
#   OUT=<dir> bash docs/results/s14/relabel_sweep.sh
# (.whl/ holds tyro and its dependencies for a machine without them.)
set -u; mkdir -p "$OUT"
[ -d .whl ] && pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/py:$PWD OMP_NUM_THREADS=1
P="timeout 540 python benchmarks/rl_probe.py --eval-every 25 --updates 500 --lr 1e-3 --ent-coef 0.01"
PIX="--obs pixels+ee --cnn instructed --image-size 64 --trunk relu"
while read -r name flags; do
  $P $flags > $OUT/$name.log 2>&1 &
done <<LIST
objects_relabel_s0 --obs objects --trunk relu --relabel
objects_relabel_s1 --obs objects --trunk relu --relabel --seed 1
objects_s0 --obs objects --trunk relu
objects_relabel_ent0 --obs objects --trunk relu --relabel --ent-coef 0
pixee_instr_relabel_s0 $PIX --relabel
pixee_instr_relabel_s1 $PIX --relabel --seed 1
pixee_instr_relabel_s2 $PIX --relabel --seed 2
pixee_instr_s0 $PIX
pixee_kp_relabel_s0 --obs pixels+ee --cnn keypoints --image-size 64 --trunk relu --relabel
pix_instr_relabel_s0 --obs pixels --cnn instructed --image-size 64 --trunk relu --relabel
pixee_instr_relabel_ent0.003 $PIX --relabel --ent-coef 0.003
pixee_instr_relabel_lr3e-4 $PIX --relabel --lr 3e-4
pixee_instr_relabel_envs32 $PIX --relabel --num-envs 32
pixee_instr_relabel_ep2 $PIX --relabel --update-epochs 2
pixee_nature_relabel_s0 --obs pixels+ee --cnn nature --image-size 64 --relabel
LIST
wait
lscpu | grep "Model name"; for f in $OUT/*.log; do echo "== $(basename $f)"; grep -v "^#" $f | tail -n 4; done
