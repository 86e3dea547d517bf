"""Atomic checkpoints as safetensors + JSON (no pickle: checkpoints are files users share).

Layout of a run directory:
    <run_dir>/checkpoints/update_000120/{model.safetensors, optimizer.safetensors, rng.safetensors,
                                          meta.json}
    <run_dir>/checkpoints/latest.json      {"checkpoint": "update_000120"}
A checkpoint is written into a hidden temporary directory, flushed to disk, then renamed into place
in one `os.rename`; only then is `latest.json` replaced (again by rename). A crash at any point leaves
either the previous checkpoint or the new one, never a half-written one that `--resume` could pick up
(RLinf PR #1469 picked one up).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable (fsync of the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def install_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move a fully written directory `tmp` to `final` (same filesystem): fsync its files and itself, then
    rename. An existing `final` is first renamed aside and removed afterwards, so readers see the old
    directory or the new one, never a mix (a crash between the two renames leaves the old one as
    `.<name>.old<pid>` next to it). For whole-directory artefacts such as `VLAPolicy.save` output."""
    tmp, final = Path(tmp), Path(final)
    for path in tmp.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON-able rest."""
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # a process that never used CUDA has no CUDA stream to save (and asking
        for i, s in enumerate(torch.cuda.get_rng_state_all()):  # would open a context on the GPU)
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(run_dir: str | Path, update: int, model: dict[str, torch.Tensor],
                    optimizer: dict[str, torch.Tensor], meta: dict, keep: int = 3,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `update` atomically; keep the newest `keep` checkpoints. `write_extra(dir)` adds
    more files or directories (e.g. the world model) to the checkpoint before it is renamed into place."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"update_{update:07d}"
    final = root / name
    tmp = root / f".tmp_{name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rng_tensors, rng_meta = rng_state()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, tmp / "model.safetensors")
    save_file(optimizer, tmp / "optimizer.safetensors")
    save_file(rng_tensors, tmp / "rng.safetensors")
    with open(tmp / "meta.json", "w") as f:
        json.dump(dict(meta, rng=rng_meta, update=update, complete=True), f, indent=1)
    if write_extra is not None:
        write_extra(tmp)
    for path in tmp.iterdir():
        if path.is_file():  # a directory from write_extra was installed (fsynced) by its writer
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # re-saving the same update (e.g. a final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    _write_json_atomic(root / LATEST, {"checkpoint": name})
    for old in sorted(p for p in root.glob("update_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ folder, or one checkpoint directory -> a complete checkpoint."""
    path = Path(path)
    for root in (path / CHECKPOINT_DIR, path):
        latest = root / LATEST
        if latest.is_file():
            candidate = root / json.loads(latest.read_text())["checkpoint"]
            if (candidate / "meta.json").is_file():
                return candidate
    if (path / "meta.json").is_file() and json.loads((path / "meta.json").read_text()).get("complete"):
        return path
    raise FileNotFoundError(f"no complete checkpoint under {path}: pass a run directory (with "
                            f"{CHECKPOINT_DIR}/{LATEST}) or a checkpoint directory (with meta.json)")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                 dict[str, torch.Tensor], dict]:
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / "meta.json").read_text())
    return (load_file(ckpt / "model.safetensors"), load_file(ckpt / "optimizer.safetensors"),
            load_file(ckpt / "rng.safetensors"), meta)
