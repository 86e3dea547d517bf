# Session 14, this 2-core CPU: does hindsight relabelling let RL improve a weak SFT policy on tabletop2d (64 px),
# where plain RL from a 19-26 % start did not move (sessions 5, 9)? One SFT policy, then the two RL arms one after
# the other, same seed and settings (accerl.py defaults otherwise), 420 s each.
set -e
R=runs/s14_weak
python demos.py collect --task tabletop2d --episodes 100 --noise 0.1 --image-size 64 --out $R/demos
python sft.py --demos $R/demos --policy.image-size 64 --policy.vision-tower resnet --policy.instruction-film \
    --policy.decoder-init-std 0.0625 --policy.embedding-init-std 0.3 --total-updates 500 --batch-size 64 \
    --threads 2 --eval-every-updates 0 --final-eval-episodes 0 --run-dir $R/sft
for arm in plain relabel; do
  flag=""; [ $arm = relabel ] && flag="--hindsight-relabel"
  python accerl.py --init-policy $R/sft/policy $flag --max-seconds 420 --total-env-steps 100000000 \
      --eval-every-updates 10 --final-eval-episodes 200 --checkpoint-every-updates 100000 --seed 1 \
      --run-dir $R/rl_$arm
done
