# NOT RUN YET: session 16 asked for a device machine and none was lent. Run: OUT=<dir> bash docs/results/s16/gpu_default/cmd.sh
# Session 16, one device call: the plain main command (tabletop2d task defaults) on the GPU machine, policy and
# learner on the GPU (bf16 autocast, the default there), 12 env workers on its CPU cores. Carry .whl (tyro).
python -m pip install -q --no-index --no-deps --target /tmp/py .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/py:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; lscpu | grep "Model name"; nproc
python accerl.py --num-env-workers 12 --max-seconds 480 --run-dir /tmp/gpu_default > $OUT/run.log 2>&1
echo "exit $?"; tail -3 $OUT/run.log | cut -c1-400
mkdir -p $OUT/tb && cp /tmp/gpu_default/events.* /tmp/gpu_default/summary.json $OUT/tb/ 2>/dev/null; ls -la $OUT/tb
