"""World-model quality: collect weak-policy data (tabletop2d), train, score on a separately collected test set;
or score (and train) on demonstration files of any task.

    python benchmarks/wm_quality.py --minutes 5                         # CPU preset: 64 px, small U-Net
    python benchmarks/wm_quality.py --checkpoint runs/X/world_model     # only score an existing model
    python benchmarks/wm_quality.py --checkpoint runs/X/world_model --throughput --device cuda
    python benchmarks/wm_quality.py --checkpoint runs/X/world_model --task libero_spatial/0 \
        --test-data demos/sp0_test --device cuda                        # any task: demos.py files as the test set
    python benchmarks/wm_quality.py --task libero_spatial/0 --train-data demos/sp0 --test-data demos/sp0_test

Default data (tabletop2d only): `--episodes` per task of world_model.py's weak scripted policies (seed 1) to
train on, 10 per task with seed 2 (other scenes) as the test set, collected into --data-dir when missing.
`--train-data` / `--test-data` take demos.py HDF5 files or directories instead (ours or the official LIBERO
files, read by `read_demos`; every test episode is scored, none is held out of it); they are what other tasks
need (benchmarks/libero_wm_quality.sh: scripted LIBERO demos). Prints the quality table (one-step and
open-loop PSNR by horizon beside the copy-last-frame baseline, reward model accuracy / calibration) and, with
--throughput, imagined env steps/s of batched `WorldModel.imagine` (chunks of 8) against the real env's
step_chunk on one core. The last line is one JSON object with every number.
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
from envs import make_env, parse_task  # noqa: E402
from world_model import (Collect, Train, TransitionData, WorldModel, WorldModelConfig, check_instructions,  # noqa: E402
                         collect, evaluate, format_table, read_episodes, resolve_device, train, write_png)

CPU_PRESET = dict(channels=(16, 32, 32), blocks_per_level=1, reward_channels=(16, 32, 32), reward_hidden=128)
"""Small enough for a few CPU minutes (~0.5 s per batch of 16 at 64 px on one free core)."""


def ensure_data(out: Path, episodes: int, seed: int, image_size: int, task: str = "tabletop2d") -> Path:
    """world_model.py's weak-policy tabletop2d episodes in `out` (collected when it holds no file yet)."""
    if not any(out.glob("*.hdf5")):
        summary = collect(Collect(task=task, episodes=episodes, image_size=image_size, out=str(out), seed=seed))
        rates = [task["success_rate"] for task in summary["tasks"].values()]
        print(f"collected {episodes} episodes per task into {out}: success {np.mean(rates):.0%}", flush=True)
    return out


def throughput(model: WorldModel, seconds: float, chunk_len: int = 8, task: str = "tabletop2d") -> dict[str, float]:
    """Imagined env steps/s of batched imagine (B rows x one chunk) and the real env's steps/s."""
    cfg, out = model.cfg, {}
    H, K = cfg.image_size, cfg.context_frames
    for batch in (1, 8, 32):
        frames = torch.zeros(batch, K, H, H, 3, dtype=torch.uint8)
        past, actions = torch.zeros(batch, K - 1, 7), torch.rand(batch, chunk_len, 7) * 2 - 1
        tasks, seeds = torch.zeros(batch, dtype=torch.long), list(range(batch))
        proprio = torch.zeros(batch, cfg.proprio_dim)  # the proprio model runs too, as in the pipeline
        model.imagine(frames, past, actions, tasks, seeds, proprio)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.imagine(frames, past, actions, tasks, seeds, proprio)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            done += batch * chunk_len
        out[f"imagined_env_steps_per_s_b{batch}"] = done / (time.perf_counter() - start)
    env, rng = make_env(task, image_size=H, seed=0), np.random.default_rng(0)
    env.reset()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, info = env.step_chunk(rng.uniform(-1, 1, (chunk_len, 7)))
        steps += info["env_steps"]
        if terminated or truncated:
            env.reset()
    out["real_env_steps_per_s_one_core"] = steps / (time.perf_counter() - start)
    env.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="score this world model instead of training one")
    parser.add_argument("--task", default="tabletop2d",
                        help="env family of the data (its instructions number the tasks); also the real env of "
                             "--throughput")
    parser.add_argument("--train-data", nargs="+", default=None,
                        help="demos.py HDF5 files / directories to train on (default: tabletop2d weak-policy data)")
    parser.add_argument("--test-data", nargs="+", default=None,
                        help="demos.py HDF5 files / directories scored whole as the test set (default: tabletop2d "
                             "weak-policy data, seed 2)")
    parser.add_argument("--data-dir", default="runs/wm_data",
                        help="where the default tabletop2d train / test data are (collected if missing)")
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
    collectable = parse_task(args.task)[0] == "tabletop2d"  # world_model.py's weak scripted policies
    if not collectable and (args.test_data is None or (args.checkpoint is None and args.train_data is None)):
        parser.error(f"--task {args.task}: pass --test-data, and --train-data or --checkpoint (demos.py files, "
                     "e.g. `python demos.py collect --task ... --keep-failures`): only tabletop2d data are collected "
                     "here")
    torch.set_num_threads(args.threads)
    size = args.image_size
    root, name = Path(args.data_dir), f"wm_{args.task.replace('/', '-')}_{size}"
    checkpoint = args.checkpoint
    if checkpoint is None:
        train_data = args.train_data or [str(ensure_data(root / name, args.episodes, 1, size, args.task))]
        run_dir = args.run_dir or f"runs/wm_quality__{int(time.time())}"
        summary = train(Train(data=tuple(train_data), task=args.task, run_dir=run_dir, threads=args.threads,
                              device=args.device,
                              model=WorldModelConfig(image_size=size, **CPU_PRESET), max_minutes=args.minutes,
                              total_updates=10**9, batch_size=args.batch_size, lr=args.lr, warmup_updates=50,
                              eval_windows=64, log_every_updates=50))
        checkpoint = summary["world_model"]
    test_data = args.test_data or [str(ensure_data(root / f"{name}_test", 10, 2, size, args.task))]
    model = WorldModel.load(checkpoint, resolve_device(args.device))
    episodes = read_episodes(tuple(test_data), model.cfg.image_size)
    if not episodes:
        raise SystemExit(f"wm_quality: no episodes in --test-data {' '.join(test_data)}")
    try:
        check_instructions(episodes, model.cfg.instructions, f"the world model {checkpoint}")
    except ValueError as error:
        raise SystemExit(f"wm_quality: the test data are not of the model's tasks: {error}") from None
    test = TransitionData(episodes, model.cfg.instructions, model.cfg.context_frames)
    metrics, image = evaluate(model, test, windows=args.windows, seed=0)
    strip = write_png(image, Path(checkpoint) / "test_strip.png")
    successes = sum(bool(e["success"]) for e in episodes)
    print(f"\nworld model {checkpoint} ({model.cfg.image_size} px) on the test set ({', '.join(test_data)}: "
          f"{len(episodes)} episodes, {successes} successful), {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s), device {model.device}")
    print(format_table(metrics, (1, 2, 4, 8)))
    print(f"strip: {strip}")
    train_json = Path(checkpoint) / "train.json"
    result = {"checkpoint": checkpoint, "task": args.task, "test_data": test_data, "test_episodes": len(episodes),
              "test_successes": successes, **metrics,
              "updates": json.loads(train_json.read_text())["updates"] if train_json.is_file() else None}
    if args.throughput:
        rates = throughput(model, args.seconds, task=args.task)
        print("| batch | imagined env steps/s | imagined chunk steps/s |\n|---|---|---|")
        for batch in (1, 8, 32):
            rate = rates[f"imagined_env_steps_per_s_b{batch}"]
            print(f"| {batch} | {rate:.1f} | {rate / 8:.2f} |")
        print(f"real {args.task}: {rates['real_env_steps_per_s_one_core']:.0f} env steps/s on one core")
        result.update(rates)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
