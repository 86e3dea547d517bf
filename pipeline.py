"""Shared-memory plumbing of the pipeline: rollout storage, weight publication, counters, logging.

Design (Sample Factory style, see style.md rule 5): every tensor that carries frames or per-step data is
allocated once, in shared memory, by the main process before any child is spawned. Queues only carry
small tuples of indices. Weights go from the learner to the inference process through one shared flat
buffer guarded by a sequence counter (a seqlock), so inference never waits for the learner.
"""

from __future__ import annotations

import math
import os
import queue
import signal
import socket
import sys
import time
from dataclasses import dataclass

import torch


def memory_use() -> dict[str, float]:
    """This process's memory in GiB: resident host memory now ("rss_gib"; what grows when something leaks
    over a long run) and, once it has used CUDA, its peak GPU memory allocated by torch ("gpu_peak_gib",
    summed over devices)."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # no procfs: the peak so far (kB on Linux, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = peak if sys.platform == "darwin" else peak * 1024
    out = {"rss_gib": rss / 2**30}
    if torch.cuda.is_initialized():
        out["gpu_peak_gib"] = sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**30
    return out


def log(role: str, message: str) -> None:
    """Every log line names the process that wrote it (style.md rule 4)."""
    print(f"{time.strftime('%H:%M:%S')} [{role}] {message}", file=sys.stderr, flush=True)


def interrupt_on_stop_signals():
    """Until the returned function is called, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, so a
    training loop that saves what it learnt on Ctrl-C does the same on `kill` / a scheduler's stop, and under
    `nohup ... &` (a non-interactive shell starts background jobs with SIGINT ignored). Returns the restorer."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    return restore


# ---------------------------------------------------------------------------------------------------
# Rollout storage
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageShape:
    num_segments: int
    """Segment slots in the pool (each env holds one while filling it; the rest wait for the learner)."""
    segment_len: int
    """T: chunk steps per segment. A segment has T + 2 rows: rows 0..T-1 are trained on, row T holds
    the bootstrap observation (it becomes row 0 of the env's next segment), row T+1 is scratch space
    for the final observation of a truncated episode, whose value bootstraps the truncated step."""
    num_cameras: int
    image_size: int
    proprio_dim: int
    instruction_len: int
    chunk_len: int
    action_dim: int
    num_bins: int


class SharedTensors:
    """Named tensors allocated once, moved to shared memory when `share`, read as attributes (`x.images`)."""

    def __init__(self, fields: dict[str, torch.Tensor], share: bool):
        self.fields = fields
        if share:
            for tensor in fields.values():
                tensor.share_memory_()

    def __getattr__(self, name: str) -> torch.Tensor:
        fields = self.__dict__.get("fields")
        if fields is not None and name in fields:
            return fields[name]
        raise AttributeError(name)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())


class RolloutStorage(SharedTensors):
    """Preallocated per-row tensors, indexed [segment, row]. Shared across processes when `share`."""

    # name -> (per-row shape builder, dtype); rows are written by env workers (observation and
    # environment outcome) and by the inference process (policy outputs).
    def __init__(self, shape: StorageShape, share: bool = True):
        self.shape = s = shape
        rows = (s.num_segments, s.segment_len + 2)
        chunk = (s.chunk_len, s.action_dim)
        super().__init__({
            # written by env workers
            "images": torch.zeros(*rows, s.num_cameras, s.image_size, s.image_size, 3, dtype=torch.uint8),
            "proprio": torch.zeros(*rows, max(s.proprio_dim, 1), dtype=torch.float32),
            "instruction": torch.zeros(*rows, s.instruction_len, dtype=torch.int64),
            "task_id": torch.zeros(*rows, dtype=torch.int64),
            "reward": torch.zeros(*rows, dtype=torch.float32),
            "terminated": torch.zeros(*rows, dtype=torch.bool),
            # at a termination: the task whose goal the final state meets (EnvSpec.reports_achieved_task), else -1
            "achieved_task": torch.full(rows, -1, dtype=torch.int64),
            "truncated": torch.zeros(*rows, dtype=torch.bool),
            "trunc_value": torch.zeros(*rows, dtype=torch.float32),
            "valid": torch.zeros(*rows, dtype=torch.bool),
            "env_steps": torch.zeros(*rows, dtype=torch.int64),
            # written by the inference process
            "action_tokens": torch.zeros(*rows, *chunk, dtype=torch.int64),
            "actions": torch.zeros(*rows, *chunk, dtype=torch.float32),
            "logp": torch.zeros(*rows, *chunk, dtype=torch.float32),
            # full behaviour log-softmax for the KL(behaviour || current) term; fp16 halves the memory
            # (the ratio uses the fp32 `logp` of the taken token, never these)
            "log_probs": torch.zeros(*rows, *chunk, s.num_bins, dtype=torch.float16),
            "value": torch.zeros(*rows, dtype=torch.float32),
            "version": torch.zeros(*rows, dtype=torch.int64),
            # set once by the wiring: the segment belongs to an imagination worker (the world model's
            # rollouts); a row's kind never changes, so copies between segments of one kind keep it
            "imagined": torch.zeros(*rows, dtype=torch.bool),
        }, share)

    def copy_row(self, src: tuple[int, int], dst: tuple[int, int]) -> None:
        for tensor in self.fields.values():
            tensor[dst] = tensor[src]

    def write_observation(self, seg: int, row: int, obs: dict, cameras: tuple[str, ...],
                          instruction: torch.Tensor, task_id: int) -> None:
        for c, key in enumerate(cameras):
            self.fields["images"][seg, row, c] = torch.from_numpy(obs[key])
        proprio = obs.get("proprio")
        if proprio is not None and self.shape.proprio_dim > 0:
            self.fields["proprio"][seg, row, : len(proprio)] = torch.from_numpy(proprio)
        self.fields["instruction"][seg, row] = instruction
        self.fields["task_id"][seg, row] = task_id
        self.fields["reward"][seg, row] = 0.0
        self.fields["terminated"][seg, row] = False
        self.fields["achieved_task"][seg, row] = -1
        self.fields["truncated"][seg, row] = False
        self.fields["trunc_value"][seg, row] = 0.0
        self.fields["valid"][seg, row] = True
        self.fields["env_steps"][seg, row] = 0


# ---------------------------------------------------------------------------------------------------
# Weight publication
# ---------------------------------------------------------------------------------------------------
class WeightBroadcast:
    """The learner publishes trainable tensors; readers copy them when the version changed.

    A seqlock: `seq` is odd while the learner writes. A reader copies only when `seq` is even and
    unchanged across its copy, so it never applies a half-written set of weights, and never blocks.

    The tensors are views into one flat shared buffer per dtype, and only those buffers travel to a
    spawned process: one shared-memory handle instead of one per tensor. (Per-tensor handles made every
    process start take ~15 s on the 362 M `large` preset's ~700 tensors, one after another.)

    A reader copies every tensor the first time, then (`only_refreshed`) only those the learner has
    re-published since its first publication: with LoRA or a frozen tower, frozen weights are copied once.
    """

    def __init__(self, named_tensors: dict[str, torch.Tensor], share: bool = True):
        self.names = list(named_tensors)
        self._index = {name: i for i, name in enumerate(self.names)}
        sizes: dict[torch.dtype, int] = {}
        self._layout = {}  # name -> (dtype, offset, shape)
        for name, tensor in named_tensors.items():
            offset = sizes.get(tensor.dtype, 0)
            self._layout[name] = (tensor.dtype, offset, tuple(tensor.shape))
            sizes[tensor.dtype] = offset + tensor.numel()
        self._flat = {dtype: torch.empty(size, dtype=dtype) for dtype, size in sizes.items()}
        self._make_views()
        for name, tensor in named_tensors.items():
            self.tensors[name].copy_(tensor.detach())
        self.seq = torch.zeros(1, dtype=torch.int64)
        self.version = torch.full((1,), -1, dtype=torch.int64)  # -1: nothing published yet
        self.refreshed = torch.zeros(len(self.names), dtype=torch.bool)  # re-published after the first time
        if share:
            for t in (*self._flat.values(), self.seq, self.version, self.refreshed):
                t.share_memory_()

    def _make_views(self) -> None:
        self.tensors = {name: self._flat[dtype][offset:offset + math.prod(shape)].view(shape)
                        for name, (dtype, offset, shape) in self._layout.items()}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "tensors"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_views()

    def publish(self, named_tensors: dict[str, torch.Tensor], version: int) -> None:
        """Copy the given tensors (all of them, or a subset such as only the trainable ones)."""
        unknown = set(named_tensors) - set(self.tensors)
        if unknown:
            raise KeyError(f"not in the broadcast layout: {sorted(unknown)[:5]}")
        self.seq += 1  # odd: writing
        for name, tensor in named_tensors.items():
            self.tensors[name].copy_(tensor.detach(), non_blocking=False)
        if int(self.version.item()) >= 0:  # not the first publication: mark these as re-published
            self.refreshed[[self._index[name] for name in named_tensors]] = True
        self.version.fill_(version)
        self.seq += 1  # even: consistent

    def published_version(self) -> int:
        return int(self.version.item())

    def read_into(self, named_params: dict[str, torch.Tensor], only_refreshed: bool = False) -> int | None:
        """Copy the published weights into `named_params`; returns their version, None if torn.
        `only_refreshed`: skip the tensors never re-published (for a reader that already holds a full copy)."""
        seq_before = int(self.seq.item())
        if seq_before % 2 == 1:
            return None
        version = int(self.version.item())
        names = [n for n, r in zip(self.names, self.refreshed.tolist()) if r] if only_refreshed else self.names
        with torch.no_grad():
            for name in names:
                named_params[name].copy_(self.tensors[name], non_blocking=False)
        if int(self.seq.item()) != seq_before:
            return None  # the learner wrote meanwhile; try again at the next batch
        return version


# ---------------------------------------------------------------------------------------------------
# Counters and heartbeats
# ---------------------------------------------------------------------------------------------------
COUNTERS = ("global_env_step", "chunk_step", "episodes", "env_restarts",
            "imagined_env_step", "imagined_chunk_step", "imagined_episodes", "imagined_env_restarts",
            "dropped_segments")
"""Real env steps, chunk steps, episodes and env rebuilds, then the same for the world model's imagined
envs, kept apart (`global_env_step`, the x axis and the budget, counts real steps only), then the real
segments overwritten before the learner took them (--when-learner-behind drop-oldest)."""


class Counters:
    """One int64 row per writer, so no lock is needed; totals are sums. Row 0 holds resumed totals."""

    def __init__(self, num_writers: int, share: bool = True):
        self.table = torch.zeros(num_writers + 1, len(COUNTERS), dtype=torch.int64)
        if share:
            self.table.share_memory_()

    def add(self, writer: int, name: str, amount: int = 1) -> None:
        self.table[writer + 1, COUNTERS.index(name)] += amount

    def total(self, name: str) -> int:
        return int(self.table[:, COUNTERS.index(name)].sum().item())

    def totals(self) -> dict[str, int]:
        sums = self.table.sum(0).tolist()
        return dict(zip(COUNTERS, sums))

    def restore(self, totals: dict[str, int]) -> None:
        for name, value in totals.items():
            if name in COUNTERS:
                self.table[0, COUNTERS.index(name)] = int(value)


class Heartbeats:
    """Wall-clock time of each process's last loop iteration; the main process reads it to name a
    process that went silent (style.md rule 6)."""

    def __init__(self, names: list[str], share: bool = True):
        self.names = list(names)
        self.created = time.time()
        self.beats = torch.zeros(len(names), dtype=torch.float64)  # 0: not stepped yet (still starting)
        if share:
            self.beats.share_memory_()

    def beat(self, name: str) -> None:
        self.beats[self.names.index(name)] = time.time()

    def silent_for(self) -> dict[str, float]:
        """Seconds since each process's last beat (since these heartbeats were made, if it never beat)."""
        now = time.time()
        return {n: now - max(float(b), self.created) for n, b in zip(self.names, self.beats.tolist())}

    def started(self, name: str) -> bool:
        """Whether the process has finished building its role and stepped it once."""
        return float(self.beats[self.names.index(name)]) > 0


class TimedGet:
    """Blocking queue reads in short slices, so a role can notice the stop flag, with the time spent
    waiting accumulated (the `perf/*_wait` metrics) and a hard limit that names the silent peer."""

    def __init__(self, role: str, limit_s: float):
        self.role, self.limit_s = role, limit_s
        self.waited_s = 0.0
        self._since: float | None = None

    def get(self, q, peer: str, poll_s: float, idle_ok: bool = False):
        """The next item, or None after `poll_s`. `idle_ok`: an empty queue is normal for this role
        (an idle server), so no limit applies."""
        start = time.perf_counter()
        try:
            item = q.get(timeout=poll_s) if poll_s > 0 else q.get_nowait()
        except queue.Empty:
            now = time.perf_counter()
            self.waited_s += now - start
            if idle_ok:
                return None
            if self._since is None:
                self._since = now
            elif now - self._since > self.limit_s:
                raise TimeoutError(f"{self.role}: nothing from {peer} for {now - self._since:.0f} s "
                                   f"(limit --wait-timeout-s {self.limit_s:.0f}); {peer} is stalled or dead")
            return None
        self.waited_s += time.perf_counter() - start
        self._since = None
        return item

    def pop_waited(self) -> float:
        waited, self.waited_s = self.waited_s, 0.0
        return waited


def free_tcp_port() -> int:
    """A TCP port free on this host now (the data-parallel learner's rendezvous; the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shm_entries() -> set[str]:
    """Names in /dev/shm (tests check that a run leaves none of its own behind)."""
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()
