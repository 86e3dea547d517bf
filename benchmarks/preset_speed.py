"""Speed of every policy preset (vla_policy.PRESETS): batched inference (`act`) and the learner step.

    python benchmarks/preset_speed.py --device cuda --presets tiny,small,base,large,xl     # GPU, ~2-3 min
    python benchmarks/preset_speed.py --device cpu --presets tiny                          # this CPU machine

Per preset: parameters (all / trainable), inferences/s through `act` (sampling included) at each batch size,
learner samples/s (`evaluate` + a GIPO-shaped loss + backward + gradient clipping + AdamW, as the learner
does), and peak GPU memory of inference at the largest batch and of the learner step. On CUDA everything
runs under bf16 autocast with float32 weights, as accerl.py's inference and learner do (--bf16); on CPU
in float32 with one thread by default (the platform runs the policy on one core). Images are at each
preset's own size unless --image-size; instructions are full-length random ids (no pad columns to trim:
the worst case). A measurement that runs out of memory prints "OOM" and the next one goes on. Prints a
markdown table with the device's name and software versions, then one JSON line with everything.
Needs no tyro (the GPU image has none): argparse only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vla_policy import PRESETS, PolicyConfig, VLAPolicy  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="tiny,small,base,large,xl", help="comma-separated PRESETS names")
    parser.add_argument("--batches", default=None, help="inference batch sizes (default 32,128,512 on cuda, 8,32 on cpu)")
    parser.add_argument("--train-batch", type=int, default=None, help="learner batch (default 128 on cuda, 32 on cpu)")
    parser.add_argument("--seconds", type=float, default=None, help="timing budget per inference measurement "
                        "(after warm-up; default 2 on cuda, 5 on cpu)")
    parser.add_argument("--train-steps", type=int, default=None, help="learner steps timed (default 5 cuda, 2 cpu)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for cuda, off for cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on cpu")
    parser.add_argument("--image-size", type=int, default=None, help="override every preset's image size")
    parser.add_argument("--instruction-tokens", type=int, default=32, help="instruction length (full, no pads)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters on every preset (peft)")
    parser.add_argument("--overrides", default="", help='more PolicyConfig fields as JSON, e.g. \'{"layout": "per_step"}\'')
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batches = [int(b) for b in (args.batches or ("32,128,512" if cuda else "8,32")).split(",")]
    args.train_batch = args.train_batch or (128 if cuda else 32)
    args.seconds = args.seconds or (2.0 if cuda else 5.0)
    args.train_steps = args.train_steps or (5 if cuda else 2)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}: use {', '.join(PRESETS)}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bf16 autocast or none (the heads compute logits and the value in float32 either way)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def random_inputs(cfg: PolicyConfig, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, cfg.num_cameras, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                           generator=g)
    tokens = torch.randint(3, 259, (batch, cfg.max_instruction_tokens), generator=g)
    return images.to(device), tokens.to(device)


def time_inference(policy: VLAPolicy, batch: int, seconds: float, bf16: bool,
                   device: torch.device) -> tuple[float, float]:
    """Observations per second through `act` (inputs already on the device, as the inference server's are): per
    wall-clock second, and per second of this process's CPU time (on a shared CPU machine the wall-clock rate
    drops with other load, the CPU-time one much less; on CUDA it only says how busy the launching thread is)."""
    images, tokens = random_inputs(policy.cfg, batch, device, seed=batch)
    proprio = random_proprio(policy.cfg, batch, device)
    with autocast(device, bf16):
        for _ in range(2):  # warm-up: allocator, kernels' autotuning, oneDNN caches
            policy.act(images, tokens, **proprio)
        sync(device)
        calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds or calls < 3:
            policy.act(images, tokens, **proprio)
            calls += 1
        sync(device)
    return calls * batch / (time.perf_counter() - start), calls * batch / (time.process_time() - cpu_start)


def random_proprio(cfg: PolicyConfig, batch: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The `proprio=` keyword for a policy that reads the robot state (random values), nothing for one that does not."""
    return {"proprio": torch.rand(batch, cfg.proprio_dim, device=device)} if cfg.proprio_dim else {}


def synthetic_rollout(cfg: PolicyConfig, batch: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random stored actions, advantages, returns and behaviour log-probs (and proprio) for a learner step on
    `batch` rows."""
    return {"actions": torch.randint(0, cfg.num_bins, (batch, cfg.chunk_len, cfg.action_dim), device=device),
            "advantages": torch.randn(batch, device=device), "returns": torch.randn(batch, device=device),
            "behaviour": torch.randn(batch, cfg.chunk_len, cfg.action_dim, cfg.num_bins, device=device).log_softmax(-1),
            **random_proprio(cfg, batch, device)}


def learner_step(policy: VLAPolicy, images: torch.Tensor, tokens: torch.Tensor, rollout: dict[str, torch.Tensor],
                 optimiser: torch.optim.Optimizer, params: list[torch.Tensor], precision) -> None:
    """What accerl.py's Learner does per minibatch, in cost: evaluate under `precision` (an autocast context) +
    a policy-gradient, value and KL loss + backward + gradient clipping + the optimiser step."""
    proprio = {"proprio": rollout["proprio"]} if "proprio" in rollout else {}
    with precision:
        out = policy.evaluate(images, tokens, rollout["actions"], **proprio)
    behaviour = rollout["behaviour"]
    ratio = (out["logp"] - out["logp"].detach()).exp()
    kl = (behaviour.exp() * (behaviour - out["log_probs"])).sum(-1).mean()
    loss = (-(ratio * rollout["advantages"][:, None, None]).mean()
            + 0.5 * (out["value"] - rollout["returns"]).pow(2).mean() + 0.1 * kl)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimiser.step()


def time_learner(policy: VLAPolicy, batch: int, steps: int, bf16: bool,
                 device: torch.device) -> tuple[float, float]:
    """Samples per second (wall, CPU time) of one learner update (`learner_step`), after two warm-up steps."""
    images, tokens = random_inputs(policy.cfg, batch, device)
    rollout = synthetic_rollout(policy.cfg, batch, device)
    optimiser = torch.optim.AdamW([{"params": policy.policy_parameters(), "lr": 1e-5},
                                   {"params": policy.value_parameters(), "lr": 1e-4}], weight_decay=0.0)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    for step in range(steps + 2):
        if step == 2:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
        learner_step(policy, images, tokens, rollout, optimiser, trainable, autocast(device, bf16))
    sync(device)
    elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
    policy.eval()
    del optimiser
    return steps * batch / elapsed, steps * batch / cpu_elapsed


def build(name: str, args: argparse.Namespace, device: torch.device) -> VLAPolicy:
    overrides = json.loads(args.overrides) if args.overrides else {}
    if args.image_size:
        overrides["image_size"] = args.image_size
    overrides |= {"max_instruction_tokens": args.instruction_tokens, "lora_rank": args.lora_rank}
    cfg = PolicyConfig.from_preset(name, **overrides)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: a 1 B model's CPU init alone takes ~10 s
        return VLAPolicy(cfg).eval()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads)
    card = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()}, {args.threads} thread(s)"
    versions = {"torch": torch.__version__}
    for module in ("transformers", "peft"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"# preset speed on {card} ({precision}; {', '.join(f'{k} {v}' for k, v in versions.items())})", flush=True)
    rows = []
    for name in args.presets:
        row = {"preset": name}
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            policy = build(name, args, device)
            cfg = policy.cfg
            row |= {"params_M": round(policy.num_parameters() / 1e6, 1),
                    "trainable_M": round(policy.num_trainable_parameters() / 1e6, 1),
                    "image_size": cfg.image_size, "slots": cfg.num_action_slots,
                    "gradient_checkpointing": cfg.gradient_checkpointing, "build_s": round(time.perf_counter() - started, 1)}
            for batch in args.batches:
                try:
                    rate, cpu_rate = time_inference(policy, batch, args.seconds, args.bf16, device)
                    row[f"act_b{batch}"] = round(rate, 1)
                    row[f"act_b{batch}_per_cpu_s"] = round(cpu_rate, 1)
                except torch.OutOfMemoryError:
                    row[f"act_b{batch}"] = "OOM"
                    torch.cuda.empty_cache()
            if cuda:
                row["act_peak_GiB"] = gib(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            try:
                rate, cpu_rate = time_learner(policy, args.train_batch, args.train_steps, args.bf16, device)
                row[f"learn_b{args.train_batch}"] = round(rate, 1)
                row[f"learn_b{args.train_batch}_per_cpu_s"] = round(cpu_rate, 1)
            except torch.OutOfMemoryError:
                row[f"learn_b{args.train_batch}"] = "OOM"
            if cuda:
                row["learn_peak_GiB"] = gib(torch.cuda.max_memory_allocated(device))
            row["config"] = dataclasses.asdict(cfg)
            del policy
        except torch.OutOfMemoryError:
            row["error"] = "OOM while building"
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        if cuda:
            torch.cuda.empty_cache()

    timed = [f"act_b{b}" for b in args.batches] + [f"learn_b{args.train_batch}"]
    columns = ["preset", "params_M", "trainable_M", "image_size", "slots"] + timed + \
              (["act_peak_GiB", "learn_peak_GiB"] if cuda else [])
    headers = {"params_M": "params (M)", "trainable_M": "trainable (M)", "image_size": "px",
               **{f"act_b{b}": f"act b{b} (obs/s)" for b in args.batches},
               f"learn_b{args.train_batch}": f"learner b{args.train_batch} (samples/s)",
               "act_peak_GiB": "peak GiB act", "learn_peak_GiB": "peak GiB learner"}
    print(f"\n{card}, {precision}, instruction {args.instruction_tokens} tokens"
          + (f", LoRA rank {args.lora_rank}" if args.lora_rank else "") + "\n")
    print("| " + " | ".join(headers.get(c, c) for c in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for c in columns:
            cell = str(row.get(c, row.get("error", "-")))
            if not cuda and c in timed and f"{c}_per_cpu_s" in row:  # shared CPU: the contention-robust rate too
                cell += f" ({row[f'{c}_per_cpu_s']} per CPU-s)"
            cells.append(cell)
        print("| " + " | ".join(cells) + " |")
    result = {"device": card, "precision": precision, "versions": versions, "args": vars(args), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
