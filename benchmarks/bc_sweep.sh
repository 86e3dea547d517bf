#!/bin/bash
# Supervised probes side by side, each pinned to 2 cores (for many-core machines): writes $OUT/<name>.log.
#   OUT=/tmp/bc bash benchmarks/bc_sweep.sh 400 "base|--lr 1e-3 --policy vision_tower=resnet" "film|..."
# usage: bc_sweep.sh STEPS "name|args" ...
steps=$1; shift
i=0
for spec in "$@"; do
  name=${spec%%|*}; a=${spec#*|}
  c0=$((i*2)); c1=$((i*2+1))
  OMP_NUM_THREADS=2 taskset -c $c0,$c1 python3 benchmarks/bc_probe.py --threads 2 --steps $steps --eval-every 100 $a > $OUT/$name.log 2>&1 &
  i=$((i+1))
done
wait
for spec in "$@"; do name=${spec%%|*}; echo "== $name: $(grep step $OUT/$name.log | tr '\n' ';')"; tail -3 $OUT/$name.log | grep -i error; done
