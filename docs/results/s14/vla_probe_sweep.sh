# Session 14: a small VLAPolicy (1 decoder layer, width 128, ResNet widths 16-96, FiLM, 16 instructed keypoints, proprio) inside
# rl_probe's loop (--net vla) with hindsight relabelling, beside the probe's instructed-keypoint CNN; one core each,
# 540 s or 500 updates. From the repo root: OUT=<dir> bash <this>
set -u; mkdir -p "$OUT"
[ -d .whl ] && pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/py:$PWD OMP_NUM_THREADS=1
P="timeout 540 python benchmarks/rl_probe.py --eval-every 10 --updates 500 --lr 1e-3 --ent-coef 0.01 --image-size 64"
I='"instructed_keypoints": true'
S='"decoder_layers": 1, "hidden": 128, "decoder_mlp": 384, "decoder_heads": 2, "resnet_widths": [16, 32, 64, 96]'
VLA="--obs pixels+proprio --net vla --relabel --kl-coef 0.1"
PIX="--obs pixels+ee --cnn instructed --trunk relu --relabel"
run() { name=$1; shift; $P "$@" > $OUT/$name.log 2>&1 & }
run ikp1 $VLA --vla-config "{$S, $I}"
run ikp1_s1 $VLA --seed 1 --vla-config "{$S, $I}"
run ikp1_kl0 $VLA --kl-coef 0 --vla-config "{$S, $I}"
run ikp1_kl0.01 $VLA --kl-coef 0.01 --vla-config "{$S, $I}"
run ikp1_lr3e-4 $VLA --lr 3e-4 --vla-config "{$S, $I}"
run ikp1_ent0.03 $VLA --ent-coef 0.03 --vla-config "{$S, $I}"
run ikp0 $VLA --vla-config "{$S, $I, \"keypoint_stage\": 0}"
run ikp1_norelabel --obs pixels+proprio --net vla --kl-coef 0.1 --vla-config "{$S, $I}"
run ikp1_2layers $VLA --vla-config "{$S, $I, \"decoder_layers\": 2}"
run ikp1_width256 $VLA --vla-config "{$S, $I, \"hidden\": 256, \"decoder_mlp\": 768, \"decoder_heads\": 4}"
run small_fixedkp $VLA --vla-config "{$S}"
run pixee_instr_relabel_s1 $PIX --seed 1
run pixee_instr_relabel_s2 $PIX --seed 2
run pixee_instr_s0 --obs pixels+ee --cnn instructed --trunk relu
wait
lscpu | grep "Model name"; for f in $OUT/*.log; do echo "== $(basename $f)"; grep -v "^#" $f | awk 'NR%3==0' | tail -n 6 | cut -c1-170; done
