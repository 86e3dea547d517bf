# Session 15, device call 1: 12 rl_probe runs of the small VLA in the probe's loop (one core each) and two pipeline
# runs (two cores each, benchmarks/parallel_cpu_runs.py), all on the device host's CPU, side by side.
# From the repo root: OUT=<dir> bash docs/results/s15/sweep1.sh
set -u; mkdir -p "$OUT"
pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/py:$PWD OMP_NUM_THREADS=1
SMALL='"decoder_layers": 1, "hidden": 128, "decoder_heads": 2, "decoder_mlp": 384, "resnet_widths": [16, 32, 64, 96], "instructed_keypoints": true'
P="python benchmarks/rl_probe.py --obs pixels+proprio --net vla --image-size 64 --ent-coef 0.01 --relabel --updates 400 --eval-every 25"
core=0
while IFS='|' read -r name flags cfg; do
  eval "taskset -c $core timeout 545 $P $flags --vla-config '{$SMALL$cfg}'" > "$OUT/$name.log" 2>&1 &
  core=$((core + 1))
done <<'LIST'
res_nodetach_s2|--lr 1e-3 --seed 2|, "decoder_residual": true, "value_detach": false
res_detach_s0|--lr 1e-3 --seed 0|, "decoder_residual": true
res_nodetach_kl0.03_s0|--lr 1e-3 --kl-coef 0.03 --seed 0|, "decoder_residual": true, "value_detach": false
res_nodetach_kl0.03_s1|--lr 1e-3 --kl-coef 0.03 --seed 1|, "decoder_residual": true, "value_detach": false
res_nodetach_lr3e-4_s0|--lr 3e-4 --seed 0|, "decoder_residual": true, "value_detach": false
res_nodetach_lr3e-4_s1|--lr 3e-4 --seed 1|, "decoder_residual": true, "value_detach": false
res_nodetach_lr5e-4_kl0.01_s0|--lr 5e-4 --kl-coef 0.01 --seed 0|, "decoder_residual": true, "value_detach": false
res_nodetach_emb1_s0|--lr 1e-3 --seed 0|, "decoder_residual": true, "value_detach": false, "embedding_init_std": 1.0
res_nodetach_stage0_s0|--lr 1e-3 --seed 0|, "decoder_residual": true, "value_detach": false, "keypoint_stage": 0
res_nodetach_ent0.003_s0|--lr 1e-3 --ent-coef 0.003 --seed 0|, "decoder_residual": true, "value_detach": false
res_nodetach_mb8_s0|--lr 1e-3 --num-minibatches 8 --seed 0|, "decoder_residual": true, "value_detach": false
res_nodetach_mb4_s0|--lr 1e-3 --num-minibatches 4 --seed 0|, "decoder_residual": true, "value_detach": false
LIST
COMMON="--policy.image-size 64 --policy.vision-tower resnet --policy.instruction-film --policy.decoder-init-std 0.0625 \
 --policy.embedding-init-std 0.3 --policy.resnet-widths 16 32 64 96 --policy.hidden 128 --policy.decoder-layers 1 \
 --policy.decoder-heads 2 --policy.decoder-mlp 384 --policy.keypoints 16 --policy.instructed-keypoints \
 --policy.proprio-dim 3 --policy.no-value-detach --hindsight-relabel --policy-lr 1e-3 --ent-coef 0.01 \
 --num-minibatches 16 --eval-every-updates 25 --final-eval-episodes 40 --checkpoint-every-updates 100000"
python benchmarks/parallel_cpu_runs.py --seconds 500 --first-core 12 --out-dir "$OUT/pipe" --common "$COMMON" \
  --config res_kl0.03_mb4="--policy.decoder-residual --kl-coef 0.03 --num-minibatches 4" \
  --config res_kl0.03_lr3e-4="--policy.decoder-residual --kl-coef 0.03 --policy-lr 3e-4" > "$OUT/pipe.txt" 2>&1 &
wait
lscpu | grep "Model name"
for f in "$OUT"/*.log; do echo "== $(basename "$f")"; grep "^update" "$f" | awk '{print $2, $4, $8, $14, $16}' | tail -n 16 | tr '\n' ';'; echo; grep -m1 -A3 Traceback "$f"; done
grep -v "^{" "$OUT/pipe.txt" | cut -c1-600
