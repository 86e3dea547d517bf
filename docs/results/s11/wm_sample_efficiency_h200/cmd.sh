# Issue 5 sample efficiency, one device call: 3 seeds x {model-free (CPU, 2 pinned cores each, default 4 real
# segments per update), with the world model (GPU policy + frozen world model, 1 real + 9 imagined segments per
# update, --wait-for-imagined)} side by side, both from the same 64 px SFT warm start (67.5 %), fp32 everywhere.
# Imagination: 4 workers x 8 imagined envs per run, batches of up to 32 in the world model and in inference.
python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/py:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; lscpu | grep "Model name"
P=runs/sft64_s11b/policy; W=runs/wm_s9/world_model; S=${SECONDS_PER_RUN:-480}
C="--task tabletop2d --policy.image-size 64 --no-bf16 --init-policy $P --max-seconds $S --total-env-steps 100000000 --num-env-workers 2 --envs-per-worker 2 --eval-every-updates 5 --eval-episodes 40 --final-eval-episodes 40 --checkpoint-every-updates 100000 --log-every-s 30"
for s in 1 2 3; do
  a=$((2 * s - 2)); b=$((2 * s - 1))
  OMP_NUM_THREADS=1 taskset -c $a,$b python accerl.py $C --device cpu --seed $s --run-dir /tmp/se/model_free_$s > /tmp/se_model_free_$s.log 2>&1 &
  taskset -c 6-15 python accerl.py $C --device cuda --seed $s --run-dir /tmp/se/with_wm_$s --wm-checkpoint $W \
    --num-imagination-workers 4 --imagined-envs-per-worker 8 --wm-max-batch 32 --max-batch 32 --imagine-horizon 4 \
    --segments-per-update 1 --imagined-share 0.9 --wait-for-imagined > /tmp/se_with_wm_$s.log 2>&1 &
done
sleep 240; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
wait
cd /tmp && for d in se/*/; do rm -rf $d/checkpoints; done && tar czf $OUT/se.tar.gz se se_*.log
for f in /tmp/se/*/summary.json; do python -c "import json,sys; s=json.load(open('$f')); print('$f', s['exit_code'], s['global_env_step'], s['updates'], s['final_eval_success'], s.get('imagined_chunk_step'), round(s.get('imagined_chunk_steps_per_s') or 0, 1))"; done
