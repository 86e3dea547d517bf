"""Grounding probe: how many supervised steps until a policy architecture tells which side of the table the
instructed object is on (tabletop2d, batch 64, AdamW; "token": cross-entropy on the first action dim's
extreme bins of every chunk step, "value": the value head regresses the side). With "unpin" the image alone
says nothing (two objects sit on each side), so a model that ignores the instruction stays at ~0.5: the
probe measures instruction grounding, which RL from random init needs first.

    python benchmarks/grounding_probe.py resnet_film_d06_e0.3,resnet_film token unpin   # GPU: ~20 s per run
    PROBE_STEPS=300 PROBE_THREADS=2 python benchmarks/grounding_probe.py resnet token pin    # CPU: slow

Prints one JSON line per run: steps until the 20-step running accuracy reaches 0.9, final running accuracy.
Results: docs/results/grounding_probe_h100.txt.
"""
import sys, time, json, torch, numpy as np
sys.path.insert(0, ".")
from vla_policy import VLAPolicy, PolicyConfig, InstructionTokenizer
from envs.tabletop2d import Tabletop2D, INSTRUCTIONS
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_num_threads(int(__import__("os").environ.get("PROBE_THREADS", 1)))
tok = InstructionTokenizer()
def run(name, target, pin, steps=int(__import__("os").environ.get("PROBE_STEPS", 300)), lr=3e-4, **kw):
    torch.manual_seed(0)
    cfg = PolicyConfig(value_detach=False, value_pooling=kw.pop("value_pooling", "prompt"), **kw)
    pol = VLAPolicy(cfg).to(dev)
    env = Tabletop2D(seed=1)
    def batch(n):
        ims, ins, ys = [], [], []
        for _ in range(n):
            o = env.reset(task_id=0 if pin else None)
            ims.append(o["image"][None]); ins.append(INSTRUCTIONS[env.task_id]); ys.append(float(env.target_xy[0] > 0))
        return torch.from_numpy(np.stack(ims)).to(dev), tok.encode(ins, 32).to(dev), torch.tensor(ys, device=dev)
    opt = torch.optim.AdamW(pol.parameters(), lr=lr)
    hist = []
    t0 = time.time()
    for step in range(steps + 1):
        im, ins, y = batch(64)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits, v = pol(im, ins)
        if target == "value":
            loss = ((v.float() - y) ** 2).mean(); acc = ((v > 0.5).float() == y).float().mean()
        else:
            lp = logits[:, :, 0].float().log_softmax(-1); lbl = torch.where(y > 0, 255, 0)
            loss = -lp.gather(2, lbl[:, None, None].expand(-1, lp.shape[1], 1)).mean(); acc = ((logits[:, 0, 0].argmax(-1) > 127).float() == y).float().mean()
        opt.zero_grad(); loss.backward(); opt.step()
        hist.append(acc.item())
        if step % 50 == 0 and dev == "cpu":
            print(name, step, round(float(np.mean(hist[-20:])), 2), f"{time.time() - t0:.0f}s", flush=True)
    # steps until running acc over 20 steps >= 0.9
    run_acc = np.convolve(hist, np.ones(20) / 20, mode="valid")
    hit = int(np.argmax(run_acc >= 0.9)) + 20 if (run_acc >= 0.9).any() else None
    print(json.dumps({"name": name, "target": target, "pin": pin, "steps_to_90": hit,
                      "final_acc20": round(float(run_acc[-1]), 2), "s": round(time.time() - t0, 1)}), flush=True)
configs = {
  "siglip": {}, "siglip_lr1e-3": {"lr": 1e-3}, "siglip_bidir": {"prefix_attention": "bidirectional"},
  "resnet": {"vision_tower": "resnet"}, "resnet_film": {"vision_tower": "resnet", "instruction_film": True},
  "siglip_e0.3": {"embedding_init_std": 0.3}, "siglip_e1": {"embedding_init_std": 1.0},
  "siglip_bidir_e0.3": {"embedding_init_std": 0.3, "prefix_attention": "bidirectional"},
  "resnet_e0.3": {"vision_tower": "resnet", "embedding_init_std": 0.3},
  "resnet_film_e0.3": {"vision_tower": "resnet", "instruction_film": True, "embedding_init_std": 0.3},
  "resnet_film_e1": {"vision_tower": "resnet", "instruction_film": True, "embedding_init_std": 1.0},
  "resnet_d06_e0.3": {"vision_tower": "resnet", "decoder_init_std": 0.0625, "embedding_init_std": 0.3},
  "resnet_film_d06_e0.3": {"vision_tower": "resnet", "instruction_film": True, "decoder_init_std": 0.0625, "embedding_init_std": 0.3},
  "siglip_d06_e0.3": {"decoder_init_std": 0.0625, "embedding_init_std": 0.3},
}
only = sys.argv[1].split(",") if len(sys.argv) > 1 else list(configs)
targets = sys.argv[2].split(",") if len(sys.argv) > 2 else ["value", "token"]
pins = [p == "pin" for p in sys.argv[3].split(",")] if len(sys.argv) > 3 else [True, False]
for name in only:
    for target in targets:
        for pin in pins:
            run(name, target, pin, **dict(configs[name]))
