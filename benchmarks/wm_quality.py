"""World-model quality on tabletop2d: collect weak-policy data, train, score on a separately collected test set.

    python benchmarks/wm_quality.py --minutes 5                         # CPU preset: 64 px, small U-Net
    python benchmarks/wm_quality.py --checkpoint runs/X/world_model     # only score an existing model
    python benchmarks/wm_quality.py --checkpoint runs/X/world_model --throughput --device cuda

Training data: `--episodes` per task of world_model.py's weak scripted policies (seed 1), test data: 10 per
task with seed 2 (other scenes). Prints the quality table (one-step and open-loop PSNR by horizon beside the
copy-last-frame baseline, reward model accuracy / calibration) and, with --throughput, imagined env steps/s
of batched `WorldModel.imagine` (chunks of 8) against the real env's step_chunk on one core. The last line
is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs import make_env  # noqa: E402
from world_model import (Collect, Train, TransitionData, WorldModel, WorldModelConfig, collect, evaluate,  # noqa: E402
                         format_table, read_episodes, resolve_device, train, write_png)

CPU_PRESET = dict(channels=(16, 32, 32), blocks_per_level=1, reward_channels=(16, 32, 32), reward_hidden=128)
"""Small enough for a few CPU minutes (~0.5 s per batch of 16 at 64 px on one free core)."""


def ensure_data(out: Path, episodes: int, seed: int, image_size: int) -> Path:
    if not any(out.glob("*.hdf5")):
        summary = collect(Collect(episodes=episodes, image_size=image_size, out=str(out), seed=seed))
        rates = [task["success_rate"] for task in summary["tasks"].values()]
        print(f"collected {episodes} episodes per task into {out}: success {np.mean(rates):.0%}", flush=True)
    return out


def throughput(model: WorldModel, seconds: float, chunk_len: int = 8) -> dict[str, float]:
    """Imagined env steps/s of batched imagine (B rows x one chunk) and the real env's steps/s."""
    cfg, out = model.cfg, {}
    H, K = cfg.image_size, cfg.context_frames
    for batch in (1, 8, 32):
        frames = torch.zeros(batch, K, H, H, 3, dtype=torch.uint8)
        past, actions = torch.zeros(batch, K - 1, 7), torch.rand(batch, chunk_len, 7) * 2 - 1
        tasks, seeds = torch.zeros(batch, dtype=torch.long), list(range(batch))
        model.imagine(frames, past, actions, tasks, seeds)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.imagine(frames, past, actions, tasks, seeds)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            done += batch * chunk_len
        out[f"imagined_env_steps_per_s_b{batch}"] = done / (time.perf_counter() - start)
    env, rng = make_env("tabletop2d", image_size=H, seed=0), np.random.default_rng(0)
    env.reset()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, info = env.step_chunk(rng.uniform(-1, 1, (chunk_len, 7)))
        steps += info["env_steps"]
        if terminated or truncated:
            env.reset()
    out["real_env_steps_per_s_one_core"] = steps / (time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="score this world model instead of training one")
    parser.add_argument("--data-dir", default="runs/wm_data", help="where the train / test data are (collected if missing)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=50, help="training episodes per task")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--windows", type=int, default=256, help="test windows scored")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--throughput", action="store_true", help="also measure imagined vs real env steps/s")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.image_size
    root = Path(args.data_dir)
    train_dir = ensure_data(root / f"wm_tabletop2d_{size}", args.episodes, 1, size)
    test_dir = ensure_data(root / f"wm_tabletop2d_{size}_test", 10, 2, size)
    checkpoint = args.checkpoint
    if checkpoint is None:
        run_dir = args.run_dir or f"runs/wm_quality__{int(time.time())}"
        summary = train(Train(data=(str(train_dir),), run_dir=run_dir, threads=args.threads, device=args.device,
                              model=WorldModelConfig(image_size=size, **CPU_PRESET), max_minutes=args.minutes,
                              total_updates=10**9, batch_size=args.batch_size, lr=args.lr, warmup_updates=50,
                              eval_windows=64, log_every_updates=50))
        checkpoint = summary["world_model"]
    model = WorldModel.load(checkpoint, resolve_device(args.device))
    test = TransitionData(read_episodes((str(test_dir),), model.cfg.image_size), model.cfg.instructions,
                          model.cfg.context_frames)
    metrics, image = evaluate(model, test, windows=args.windows, seed=0)
    strip = write_png(image, Path(checkpoint) / "test_strip.png")
    print(f"\nworld model {checkpoint} on the test set ({test_dir}), {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s), device {model.device}")
    print(format_table(metrics, (1, 2, 4, 8)))
    print(f"strip: {strip}")
    train_json = Path(checkpoint) / "train.json"
    result = {"checkpoint": checkpoint, **metrics,
              "updates": json.loads(train_json.read_text())["updates"] if train_json.is_file() else None}
    if args.throughput:
        rates = throughput(model, args.seconds)
        print("| batch | imagined env steps/s | imagined chunk steps/s |\n|---|---|---|")
        for batch in (1, 8, 32):
            rate = rates[f"imagined_env_steps_per_s_b{batch}"]
            print(f"| {batch} | {rate:.1f} | {rate / 8:.2f} |")
        print(f"real tabletop2d: {rates['real_env_steps_per_s_one_core']:.0f} env steps/s on one core")
        result.update(rates)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
