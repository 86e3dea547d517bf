# Session 14, this 2-core CPU, 20 minutes: the pipeline with the layout that learned in the probe's loop (the decoder
# bypassed: action slots = slot embedding + state MLP of [16 instructed keypoints, proprio, instruction code]; the
# critic's gradient in the trunk; small ResNet + FiLM tower), hindsight relabelling, no KL. An ablation, not the VLA.
python accerl.py --policy.image-size 64 --policy.vision-tower resnet --policy.instruction-film \
    --policy.decoder-init-std 0.0625 --policy.embedding-init-std 0.3 --policy.resnet-widths 16 32 64 96 \
    --policy.hidden 128 --policy.decoder-layers 1 --policy.decoder-heads 2 --policy.decoder-mlp 384 \
    --policy.keypoints 16 --policy.instructed-keypoints --policy.proprio-dim 3 --policy.bypass-decoder \
    --policy.no-value-detach --policy-lr 1e-3 --ent-coef 0.01 --kl-coef 0 --num-minibatches 16 --hindsight-relabel \
    --max-seconds 1200 --total-env-steps 100000000 --eval-every-updates 25 --final-eval-episodes 200 \
    --checkpoint-every-updates 100000 --run-dir runs/s14_bypass_state_relabel
