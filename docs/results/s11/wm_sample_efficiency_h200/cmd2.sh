# Issue 5, second call: the world model of the first call (session 9's, pre-trained on the scripted weak mix) scores
# worse than copy-last-frame on the SFT policy's own episodes, so (1) fine-tune it on 1,000 trajectories of a weak
# VLA policy (the 52.5 % SFT policy, sampled), (2) score it on 100 episodes of the 67.5 % start policy, (3) run the
# world-model arm with less real data per update: 1 real env, segments of 16 chunk steps, 19 imagined per real.
python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/py:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python world_model.py collect --policy-dir runs/sft64_s9b/policy --episodes 250 --image-size 64 --seed 1 --out /tmp/wm_data 2>&1 | grep -E "success_rate|seconds"
python world_model.py collect --policy-dir runs/sft64_s11b/policy --episodes 25 --image-size 64 --seed 3 --out /tmp/wm_test 2>&1 | grep -E "success_rate|seconds"
python world_model.py train --data /tmp/wm_data --init runs/wm_s9/world_model --device cuda --max-minutes 2.8 --batch-size 64 \
  --log-every-updates 1000 --out /tmp/wm_new --run-dir /tmp/wm_run > /tmp/wm_train.log 2>&1; tail -4 /tmp/wm_train.log
python benchmarks/wm_quality.py --checkpoint /tmp/wm_new --test-data /tmp/wm_test --device cuda > /tmp/wmq_new.txt 2>&1; tail -9 /tmp/wmq_new.txt | head -8
P=runs/sft64_s11b/policy; S=${SECONDS_PER_RUN:-290}
C="--task tabletop2d --policy.image-size 64 --no-bf16 --init-policy $P --max-seconds $S --total-env-steps 100000000 --eval-every-updates 5 --eval-episodes 40 --final-eval-episodes 40 --checkpoint-every-updates 100000 --log-every-s 30"
for s in 1 2 3; do
  taskset -c 1-15 python accerl.py $C --device cuda --seed $s --run-dir /tmp/se/with_wm16_$s --wm-checkpoint /tmp/wm_new \
    --num-env-workers 1 --envs-per-worker 1 --segment-len 16 --segments-per-update 1 --imagined-share 0.95 --wait-for-imagined \
    --num-imagination-workers 4 --imagined-envs-per-worker 8 --wm-max-batch 32 --max-batch 32 --imagine-horizon 4 > /tmp/se_with_wm16_$s.log 2>&1 &
done
wait
cd /tmp && for d in se/*/; do rm -rf $d/checkpoints; done && tar czf $OUT/se2.tar.gz se se_*.log wm_train.log wmq_new.txt wm_run
for f in /tmp/se/*/summary.json; do python -c "import json,sys; s=json.load(open('$f')); print('$f', s['exit_code'], s['global_env_step'], s['updates'], s['final_eval_success'], s.get('imagined_chunk_step'), round(s.get('imagined_chunk_steps_per_s') or 0, 1))"; done
