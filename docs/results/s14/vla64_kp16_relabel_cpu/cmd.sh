# Session 14, this 2-core CPU: session 13's keypoint + proprio VLA (64 px, lr 1e-3, entropy 0.01, 16 minibatches)
# with hindsight instruction relabelling, 20 minutes.
python accerl.py --policy.image-size 64 --policy.vision-tower resnet --policy.instruction-film \
    --policy.decoder-init-std 0.0625 --policy.embedding-init-std 0.3 --policy.keypoints 16 --policy.proprio-dim 3 \
    --policy-lr 1e-3 --ent-coef 0.01 --num-minibatches 16 --hindsight-relabel --max-seconds 1200 \
    --total-env-steps 100000000 --eval-every-updates 25 --final-eval-episodes 200 --checkpoint-every-updates 100000 \
    --run-dir runs/s14_vla64_kp_relabel
