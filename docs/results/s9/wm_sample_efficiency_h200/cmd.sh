# Issue 5 sample efficiency, one device call: 3 seeds x {model-free (CPU, 2 pinned cores each), with the world model
# (GPU policy + world model, --wait-for-imagined)} side by side, both from the same SFT warm start, fp32 everywhere.
python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/py:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep "Model name"
P=runs/sft64_s9b/policy; W=runs/wm_s9/world_model; S=${SECONDS_PER_RUN:-330}
C="--task tabletop2d --policy.image-size 64 --no-bf16 --init-policy $P --max-seconds $S --total-env-steps 100000000 --num-env-workers 2 --envs-per-worker 2 --eval-every-updates 5 --eval-episodes 40 --final-eval-episodes 40 --checkpoint-every-updates 100000 --log-every-s 30"
for s in 1 2 3; do
  a=$((2 * s - 2)); b=$((2 * s - 1))
  OMP_NUM_THREADS=1 taskset -c $a,$b python accerl.py $C --device cpu --seed $s --run-dir /tmp/se/model_free_$s > $OUT/model_free_$s.log 2>&1 &
  taskset -c 6-15 python accerl.py $C --device cuda --seed $s --run-dir /tmp/se/with_wm_$s --wm-checkpoint $W \
    --num-imagination-workers 8 --imagined-envs-per-worker 1 --imagine-horizon 4 --segments-per-update 1 \
    --imagined-share 0.834 --wait-for-imagined > $OUT/with_wm_$s.log 2>&1 &
done
wait
for d in /tmp/se/*/; do n=$(basename $d); mkdir -p $OUT/$n; cp $d/events* $d/summary.json $OUT/$n/; done
python benchmarks/learning_curve.py /tmp/se/model_free_{1,2,3} /tmp/se/with_wm_{1,2,3} --labels mf_s1 mf_s2 mf_s3 wm_s1 wm_s2 wm_s3 --threshold 0.8 --sustain 3 --title "tabletop2d from a SFT start: greedy success vs real env steps" --out $OUT/wm_sample_efficiency.png 2>&1 | tail -20
