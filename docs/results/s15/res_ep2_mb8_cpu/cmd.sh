# Session 15, this 2-core CPU, 20 minutes: the small VLA with --policy.decoder-residual (action slots = slot
# embedding + state MLP of [16 instructed keypoints, proprio, instruction code], plus the 1-layer decoder's output,
# whose gain starts at zero), the critic's gradient in the trunk, hindsight relabelling, KL 0.03, 2 epochs x 8 minibatches, lr decayed over
# 700 updates.
python accerl.py --policy.image-size 64 --policy.vision-tower resnet --policy.instruction-film \
    --policy.decoder-init-std 0.0625 --policy.embedding-init-std 0.3 --policy.resnet-widths 16 32 64 96 \
    --policy.hidden 128 --policy.decoder-layers 1 --policy.decoder-heads 2 --policy.decoder-mlp 384 \
    --policy.keypoints 16 --policy.instructed-keypoints --policy.proprio-dim 3 --policy.decoder-residual \
    --policy.no-value-detach --policy-lr 1e-3 --lr-decay-updates 700 --ent-coef 0.01 --kl-coef 0.03 \
    --num-minibatches 8 --update-epochs 2 --hindsight-relabel \
    --max-seconds 1200 --total-env-steps 100000000 --eval-every-updates 25 --final-eval-episodes 200 \
    --checkpoint-every-updates 100000 --run-dir runs/s15_res_ep2_mb8
