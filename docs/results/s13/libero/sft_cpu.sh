# Session 13, this 2-core CPU: SFT of the session-5 LIBERO policy (ResNet + FiLM, larger init scales, agent view,
# 128 px) on the 39 scripted demos of libero_spatial/0 collected here (demos.py collect --episodes 40 --workers 2
# --noise 0.1: 555 s), 800 updates of 64 chunks.
python sft.py --demos runs/s13_libero/demos --task libero_spatial/0 --policy.vision-tower resnet \
    --policy.instruction-film --policy.decoder-init-std 0.0625 --policy.embedding-init-std 0.3 \
    --total-updates 800 --batch-size 64 --threads 2 --eval-every-updates 0 --final-eval-episodes 0 \
    --run-dir runs/s13_libero/sft
