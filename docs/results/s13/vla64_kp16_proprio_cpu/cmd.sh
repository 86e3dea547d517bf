# Session 13, this 2-core CPU: the VLA with the keypoint readout (16 keypoints of the FiLM-conditioned stride-8
# stage) and the EE proprio, 64 px, the probe's recipe (lr 1e-3, entropy 0.01, 16 minibatches), 20 minutes.
python accerl.py --policy.image-size 64 --policy.vision-tower resnet --policy.instruction-film \
    --policy.decoder-init-std 0.0625 --policy.embedding-init-std 0.3 --policy.keypoints 16 --policy.proprio-dim 3 \
    --policy-lr 1e-3 --ent-coef 0.01 --num-minibatches 16 --max-seconds 1200 --total-env-steps 100000000 \
    --eval-every-updates 25 --final-eval-episodes 200 --checkpoint-every-updates 100000 --run-dir runs/s13_vla64_kp
