# (1) A --device cpu run on a GPU host must open no CUDA context (fixed in session 9, unverified there).
# (2) Imagination batching on the GPU: the session-9 world model and SFT policy, 8 imagination workers with
#     1 vs 4 imagined envs each (one world-model batch per worker's ready chunks), 75 s each, frozen model.
python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/py:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; lscpu | grep "Model name"
python accerl.py --device cpu --max-seconds 40 --total-env-steps 100000000 --policy.image-size 64 --run-dir /tmp/cpu_run \
  --eval-every-updates 0 --final-eval-episodes 0 --log-every-s 10 > /tmp/cpu_run.log 2>&1 &
sleep 30; echo "compute apps during the --device cpu run:"; nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
wait; python -c "import json; s=json.load(open('/tmp/cpu_run/summary.json')); print('cpu run exit', s['exit_code'], 'env steps', s['global_env_step'], 'memory_max keys', {k: sorted(v) for k, v in s['memory_max'].items()})"
P=runs/sft64_s9b/policy; W=runs/wm_s9/world_model
for E in 1 4; do
  python accerl.py --task tabletop2d --policy.image-size 64 --no-bf16 --init-policy $P --device cuda --max-seconds 75 \
    --total-env-steps 100000000 --num-env-workers 2 --envs-per-worker 2 --eval-every-updates 0 --final-eval-episodes 0 \
    --checkpoint-every-updates 100000 --log-every-s 15 --wm-checkpoint $W --num-imagination-workers 8 \
    --imagined-envs-per-worker $E --imagine-horizon 4 --segments-per-update 1 --imagined-share 0.834 \
    --run-dir /tmp/img_$E > $OUT/img_envs$E.log 2>&1
  python - <<PY
import json, glob, numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
s = json.load(open("/tmp/img_$E/summary.json"))
ea = EventAccumulator(glob.glob("/tmp/img_$E/events*")[0], size_guidance={"scalars": 0}); ea.Reload()
def med(tag):
    v = [e.value for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []
    return float(np.median(v[len(v) // 3:])) if v else None  # the last two thirds (past start-up)
print(json.dumps({"imagined_envs_per_worker": $E, "imagined_chunk_steps": s["imagined_chunk_step"],
    "imagined_chunk_steps_per_s_wall": s["imagined_chunk_steps_per_s"],
    "imagined_chunk_steps_per_s_progress": med("perf/imagined_chunk_steps_per_s"),
    "wm_batch_size": med("perf/wm_batch_size"), "wm_latency_ms": med("perf/wm_latency_ms"),
    "wm_busy_fraction": s["wm_busy_fraction"], "updates": s["updates"], "real_env_steps": s["global_env_step"],
    "wall_s": s["wall_seconds"]}))
PY
done
