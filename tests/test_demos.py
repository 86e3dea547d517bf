"""Demonstrations (demos.py) and the supervised warm start (sft.py): a miniature file in the official LIBERO
layout built here with h5py alone, DemoWriter -> read_demos round trips, the collection command run as a
subprocess (replayed step by step in the env), chunk targets and masks, and a tiny SFT run whose loss
falls and whose saved policy loads. ~15 s on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from demos import Collect, DemoWriter, episode_seeds, read_demos, task_file_name
from envs.libero import OPENVLA_ACTION_STATS
from envs.tabletop2d import INSTRUCTIONS, Tabletop2D
from vla_policy import PolicyConfig, VLAPolicy

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=1, vision_mlp=64,
            hidden=32, decoder_layers=1, decoder_heads=1, decoder_mlp=64, value_hidden=32)
LIBERO_TASK = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"


# ---------------------------------------------------------------------------------------------------
# The official LIBERO layout (scripts/create_dataset.py of Lifelong-Robot-Learning/LIBERO)
# ---------------------------------------------------------------------------------------------------
def camera_view(t: int, size: int = 128) -> np.ndarray:
    """The camera's true view at step t: value t everywhere, a white block in the top-left corner."""
    frame = np.full((size, size, 3), t, dtype=np.uint8)
    frame[:8, :16] = 255
    return frame


def write_official_file(directory: Path, steps: int = 6) -> tuple[Path, np.ndarray]:
    """Two demos as LIBERO ships them: OSC_POSE actions, frames upside down and recorded *after* each step,
    no success or proprio of ours. Demo 1 failed (rewards 0). Returns the path and demo 0's normalised
    actions (what read_demos must give back)."""
    path = directory / "libero_spatial" / f"{LIBERO_TASK}_demo.hdf5"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    q01, q99 = (np.array(v) for v in OPENVLA_ACTION_STATS["libero_spatial"])
    normalised = rng.uniform(-0.9, 0.9, (steps, 7))
    normalised[:, 6] = np.where(np.arange(steps) < 3, -1.0, 1.0)  # LIBERO gripper: -1 open, +1 close
    raw = normalised.copy()
    raw[:, :6] = (normalised[:, :6] + 1) / 2 * (q99 - q01) + q01
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        bddl = f"chiliocosm/bddl_files/libero_spatial/{LIBERO_TASK}.bddl"
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation",
                                                 "domain_name": "robosuite",
                                                 "language_instruction": "Pick up the black bowl between the plate "
                                                                         "and the ramekin and place it on the plate"})
        data.attrs["macros_image_convention"] = "opengl"
        data.attrs["bddl_file_name"] = bddl
        data.attrs["bddl_file_content"] = "(define (problem LIBERO_Tabletop_Manipulation))"
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation",
                                             "problem_name": "libero_tabletop_manipulation", "bddl_file": bddl,
                                             "env_kwargs": {"control_freq": 20, "camera_heights": 128}})
        for i in range(2):
            demo = data.create_group(f"demo_{i}")
            obs = demo.create_group("obs")
            frames = np.stack([camera_view(t)[::-1] for t in range(steps)])  # OpenGL readout: upside down
            obs.create_dataset("agentview_rgb", data=frames)
            obs.create_dataset("eye_in_hand_rgb", data=frames // 2)
            ee = rng.normal(size=(steps, 6))
            obs.create_dataset("ee_states", data=ee)
            obs.create_dataset("ee_pos", data=ee[:, :3])
            obs.create_dataset("ee_ori", data=ee[:, 3:])
            obs.create_dataset("gripper_states", data=rng.normal(size=(steps, 2)))
            obs.create_dataset("joint_states", data=rng.normal(size=(steps, 7)))
            demo.create_dataset("actions", data=raw)
            demo.create_dataset("states", data=rng.normal(size=(steps, 47)))
            demo.create_dataset("robot_states", data=rng.normal(size=(steps, 9)))
            ends = np.zeros(steps, dtype=np.uint8)
            ends[-1] = 1
            demo.create_dataset("rewards", data=ends * (i == 0))
            demo.create_dataset("dones", data=ends)
            demo.attrs["num_samples"] = steps
            demo.attrs["model_file"] = "<mujoco model='base'/>"
            demo.attrs["init_state"] = demo["states"][0]
        data.attrs["num_demos"] = 2
        data.attrs["total"] = 2 * steps
    return path, normalised


def test_reads_the_official_libero_layout(tmp_path):
    path, normalised = write_official_file(tmp_path)
    episodes = read_demos(tmp_path)  # a directory, searched recursively
    assert [e["success"] for e in episodes] == [True, False]  # from rewards
    first = episodes[0]
    # the adapter's instruction (LIBERO's task.language from the file name), not the BDDL's capitalised one
    assert first["instruction"] == LIBERO_TASK.replace("_", " ")
    # obs[t] was recorded after action t: it pairs with action t + 1, the last frame has no action
    assert len(first["actions"]) == len(first["images"]) == len(first["proprio"]) == 5
    assert [int(frame[64, 64, 0]) for frame in first["images"]] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(first["actions"], normalised[1:], atol=1e-5)
    assert first["actions"].dtype == np.float32 and first["images"].dtype == np.uint8
    # OpenVLA orientation (the adapter's default): upright, mirrored left-right -> the block is top-right
    assert first["images"].shape == (5, 128, 128, 3)
    assert (first["images"][:, :8, -16:] == 255).all() and (first["images"][:, :8, :16] != 255).all()
    assert (first["wrist_images"][:, :8, -16:] == 127).all()
    with h5py.File(path) as f:
        obs = f["data/demo_0/obs"]
        expected = np.concatenate([obs["ee_pos"][()], obs["ee_ori"][()], obs["gripper_states"][()]], axis=1)
        np.testing.assert_allclose(first["proprio"], expected[:5], rtol=1e-6)  # the adapter's 8-D proprio
        stored = obs["agentview_rgb"][()]

    camera = read_demos(path, image_orientation="camera", libero_obs_shift=False, only_successful=True)
    assert len(camera) == 1 and len(camera[0]["actions"]) == 6
    np.testing.assert_allclose(camera[0]["actions"], normalised, atol=1e-5)
    assert (camera[0]["images"][:, :8, :16] == 255).all()  # the true view: block top-left
    raw = read_demos(path, image_orientation="stored", action_stats="raw", libero_obs_shift=False, wrist=False)
    np.testing.assert_array_equal(raw[0]["images"], stored)
    assert raw[0]["wrist_images"] is None
    assert np.abs(raw[0]["actions"][:, :6]).max() < 1.0 and not np.allclose(raw[0]["actions"], normalised)
    small = read_demos(path, image_size=32)
    assert small[0]["images"].shape == (5, 32, 32, 3)


# ---------------------------------------------------------------------------------------------------
# DemoWriter
# ---------------------------------------------------------------------------------------------------
def random_episode(rng, steps: int, size: int = 16) -> dict:
    return {"images": rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8),
            "wrist_images": rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8),
            "actions": rng.uniform(-1, 1, (steps, 7)), "proprio": rng.normal(size=(steps, 3)).astype(np.float32),
            "states": rng.normal(size=(steps, 11))}


@pytest.mark.parametrize("orientation", ["camera", "openvla"])
def test_writer_reader_round_trip(tmp_path, orientation):
    rng = np.random.default_rng(1)
    episodes = [random_episode(rng, 5), random_episode(rng, 3)]
    path = tmp_path / task_file_name("Pick up the red block!")
    assert path.name == "pick_up_the_red_block_demo.hdf5"
    with DemoWriter(path, "pick up the red block", image_orientation=orientation, task="tabletop2d/0",
                    task_id=0) as writer:
        for e, success in zip(episodes, (True, False)):
            writer.add_episode(e["images"], e["actions"], e["proprio"], success, wrist_images=e["wrist_images"],
                               states=e["states"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left

    back = read_demos(path)
    assert len(back) == 2
    for e, b, success in zip(episodes, back, (True, False)):
        np.testing.assert_array_equal(b["images"], e["images"])  # the orientation the env returned
        np.testing.assert_array_equal(b["wrist_images"], e["wrist_images"])
        np.testing.assert_allclose(b["actions"], e["actions"].astype(np.float32))
        np.testing.assert_array_equal(b["proprio"], e["proprio"])
        assert b["instruction"] == "pick up the red block" and b["success"] is success and b["task_id"] == 0
    assert len(read_demos(path, only_successful=True)) == 1

    # on disk: LIBERO's layout and image convention (upside down; OpenVLA frames un-mirrored first)
    with h5py.File(path) as f:
        data = f["data"]
        assert data.attrs["num_demos"] == 2 and data.attrs["total"] == 8
        assert data.attrs["macros_image_convention"] == "opengl"
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == "pick up the red block"
        demo = data["demo_0"]
        assert demo.attrs["num_samples"] == 5
        assert set(demo) == {"actions", "dones", "rewards", "states", "robot_states", "obs"}
        assert set(demo["obs"]) == {"agentview_rgb", "eye_in_hand_rgb", "proprio"}
        view = episodes[0]["images"][:, ::-1] if orientation == "camera" else episodes[0]["images"][:, ::-1, ::-1]
        np.testing.assert_array_equal(demo["obs/agentview_rgb"][()], view)
        assert list(demo["dones"][()]) == [0, 0, 0, 0, 1] and list(demo["rewards"][()]) == [0, 0, 0, 0, 1]
        assert list(data["demo_1/rewards"][()]) == [0, 0, 0]
        np.testing.assert_array_equal(demo.attrs["init_state"], episodes[0]["states"][0])


def test_writer_is_atomic_and_appends_files(tmp_path):
    rng = np.random.default_rng(2)
    e = random_episode(rng, 4)
    part = tmp_path / "part.hdf5"
    with DemoWriter(part, "pick up the red block") as writer:
        writer.add_episode(e["images"], e["actions"], e["proprio"], True)
        writer.add_episode(e["images"], e["actions"], e["proprio"], True)
    final = tmp_path / "out" / "pick_up_the_red_block_demo.hdf5"
    with DemoWriter(final, "pick up the red block") as writer:
        assert writer.append_file(part) == 2
        writer.add_episode(e["images"][:2], e["actions"][:2], e["proprio"][:2], True)
    assert [len(b["actions"]) for b in read_demos(final)] == [4, 4, 2]
    with pytest.raises(RuntimeError):  # a failure inside `with` keeps the previous file as it was
        with DemoWriter(final, "pick up the red block") as writer:
            writer.add_episode(e["images"], e["actions"], e["proprio"], True)
            raise RuntimeError("crash while writing")
    assert len(read_demos(final)) == 3
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
    with pytest.raises(ValueError):
        with DemoWriter(tmp_path / "bad.hdf5", "x") as writer:
            writer.add_episode(e["images"][:3], e["actions"], e["proprio"], True)  # T mismatch


# ---------------------------------------------------------------------------------------------------
# Collection (subprocess of the real command) and SFT
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tabletop_demos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demos")
    result = subprocess.run([sys.executable, str(ROOT / "demos.py"), "collect", "--task", "tabletop2d",
                             "--episodes", "4", "--out", str(out), "--workers", "1", "--image-size", "32",
                             "--noise", "0.1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "expert success" in result.stdout
    return out


def test_collect_writes_one_file_per_task_that_replays(tabletop_demos):
    assert Collect().image_size == PolicyConfig().image_size and Collect().chunk_len == PolicyConfig().chunk_len
    files = sorted(p.name for p in tabletop_demos.glob("*.hdf5"))
    assert files == sorted(task_file_name(text) for text in INSTRUCTIONS)
    summary = json.loads((tabletop_demos / "collect_summary.json").read_text())
    assert all(row["success_rate"] == 1.0 and row["demos_written"] == 4 for row in summary["tasks"].values())
    episodes = read_demos(tabletop_demos)
    assert len(episodes) == 16 and {e["instruction"] for e in episodes} == set(INSTRUCTIONS)
    # replay: images[t] is the observation before actions[t], and the actions reproduce the success
    env = Tabletop2D(image_size=32)
    for e in episodes:
        task_id = e["task_id"]
        k = int(e["source"].rsplit("demo_", 1)[1])
        obs = env.reset(task_id=task_id, seed=episode_seeds(1, task_id, k)[0])
        assert env.instruction == e["instruction"] and e["images"].shape[1:] == (32, 32, 3)
        for t, action in enumerate(e["actions"]):
            np.testing.assert_array_equal(obs["image"], e["images"][t])
            np.testing.assert_allclose(obs["proprio"], e["proprio"][t], atol=1e-5)  # float32 actions replayed
            obs, _, terminated, truncated, info = env.step(action)
        assert terminated and info["success"]


def tiny_policy() -> VLAPolicy:
    torch.manual_seed(0)
    return VLAPolicy(PolicyConfig(**TINY, chunk_len=4))


def test_chunks_mask_the_slots_past_the_last_action():
    from sft import DemoChunks

    rng = np.random.default_rng(3)
    episodes = []
    for steps in (2, 6):
        e = random_episode(rng, steps, size=32)
        episodes.append({"images": e["images"], "wrist_images": None, "actions": e["actions"].astype(np.float32),
                         "instruction": "pick up the red block", "source": "x"})
    policy = tiny_policy()
    data = DemoChunks(episodes, policy, "mask")
    batch = data.batch(torch.tensor([0, 1, 2, 5, 7]))  # steps 0-1 are demo 0, steps 2-7 demo 1
    assert batch["mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["action_tokens"].shape == (5, 4, 7) and batch["images"].shape == (5, 1, 32, 32, 3)
    assert torch.equal(batch["action_tokens"][3, :3], data.tokens[5:8])
    assert torch.equal(batch["action_tokens"][1, 1], data.tokens[1])  # padded slots repeat the last action
    repeat = DemoChunks(episodes, policy, "repeat-last").batch(torch.tensor([1]))
    assert repeat["mask"].all() and torch.equal(repeat["action_tokens"], batch["action_tokens"][1:2])


def test_sft_loss_falls_and_the_policy_loads(tabletop_demos, tmp_path):
    import sft

    threads = torch.get_num_threads()
    try:
        summary = sft.main(sft.Args(demos=str(tabletop_demos), run_dir=str(tmp_path / "run"), threads=1,
                                    policy=PolicyConfig(**TINY), total_updates=60, batch_size=16, lr=3e-3,
                                    warmup_updates=5, log_every_updates=10, eval_every_updates=30,
                                    eval_episodes=4, final_eval_episodes=4))
    finally:
        torch.set_num_threads(threads)
    assert summary["updates"] == 60 and summary["num_demos"] == 16
    assert summary["final_loss"] < summary["first_loss"] - 1.5  # from ln(256) = 5.55
    assert summary["final_eval"]["episodes"] == 4 and 0.0 <= summary["final_eval"]["greedy_success"] <= 1.0

    policy = VLAPolicy.load(summary["policy_dir"]).eval()
    assert policy.cfg.image_size == 32 and not list((tmp_path / "run").glob(".policy*"))  # no temporary left
    # the loaded weights are the trained ones: their loss on the demos is the trained loss, not ln(256)
    data = sft.DemoChunks(read_demos(tabletop_demos), policy, "mask")
    with torch.no_grad():
        loss, _ = sft.sft_loss(policy, data.batch(torch.arange(len(data))), torch.device("cpu"), False)
    assert loss.item() < summary["first_loss"] - 1.5
    assert json.loads((Path(summary["policy_dir"]) / "sft.json").read_text())["updates"] == 60

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"losses/sft_loss", "charts/token_accuracy", "charts/lr", "eval/greedy_success",
            "perf/sft_samples_per_s"} <= tags
    assert [e.step for e in events.Scalars("eval/greedy_success")] == [30, 60]
