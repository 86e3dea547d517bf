"""Build the pruned LIBERO bundle for the GPU machine (no registry there, <= 64 MiB per call), and check it.

    python -m envs.libero_bundle --out .bundle                 # build (all five suites), ~3-5 min here
    python -m envs.libero_bundle --out .bundle --suites libero_spatial libero_10
    python -m envs.libero_bundle --verify .bundle              # check the bundle here (no GPU needed)

On the GPU machine, from the repo root, with `.bundle` carried along:  source envs/libero_gpu_setup.sh

What goes into `<out>/` (nothing else; stale files there are removed):
- sim.tar.xz: top-level `robosuite/` and `libero/` packages (+ their dist-info), unpacked onto PYTHONPATH.
  robosuite 1.4.0's code (everything outside models/assets) and, of models/assets, only the files the tasks
  use (the Panda arm, its gripper, the mounts used); libero 0.1.1's code, the suites' BDDL files, their
  `.pruned_init` initial states, and `libero/libero/assets/` holding only the scene files the tasks use,
  textures capped at --max-texture-size px with exactly the pixels envs/libero.py's capped copies have
  (so images match a full install's default max_texture_size=1024 bit for bit; a full install with
  max_texture_size=0 differs slightly: the full textures are not carried). Textures are stored as PNGs
  with uncompressed deflate blocks (same pixels), which xz packs 25% smaller than the original PNGs.
  The files used are found by instrumentation: every task of every suite is built here through
  envs.libero's own path (`_TaskSim`) with `open` recorded (robosuite/LIBERO read their XML files in
  Python) and the model XML captured where envs.libero caps its textures (every <mesh file>/<texture file>
  MuJoCo would open); the MuJoCo compile is skipped (0.02 s a task instead of 4-10 s). --full-build builds,
  resets and steps every task instead (slow), recording files opened after the compile as well.
- *.whl: cp312 manylinux x86_64 wheels (mujoco 3.3.2, pyopengl, glfw, gymnasium, farama-notifications,
  easydict, future, termcolor, bddl 1.0.1) and the project's own needs that the GPU image lacks (tyro with
  docstring-parser and typeguard: every entry script parses its flags with tyro; KINDS.md's package list);
  extra/typing_extensions-*.whl (installed only where missing or older than typeguard needs).
  The mujoco wheel's members are recompressed with LZMA (same bytes inside; 1.6 MiB less to carry).
- debs/*.deb: Debian's libglvnd EGL/GL loaders (the GPU image has no libEGL; platform.md).
- manifest.json: suites, tasks, versions, sizes, sha256 of each file.
"""

from __future__ import annotations

import argparse
import builtins
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import envs.libero as L  # noqa: E402  (sets MUJOCO_GL before anything imports mujoco)

ALL_SUITES = list(L.SUITES)
PY_TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
             "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
# (distribution, version pin or None = the version installed here, else the newest)
WHEELS = [("mujoco", "3.3.2"), ("pyopengl", None), ("glfw", None), ("gymnasium", "1.4.0"),
          ("farama-notifications", None), ("easydict", "1.14"), ("future", "1.0.0"), ("termcolor", "3.3.0")]
# the project's command lines (tyro.cli) on the GPU image, which has no tyro (KINDS.md); pure Python, 0.2 MiB
PROJECT_WHEELS = [("tyro", None), ("docstring-parser", None), ("typeguard", None)]
BUILT_WHEELS = [("bddl", "1.0.1")]  # `pip wheel --no-deps` (builds from the sdist where no wheel exists)
EXTRA_WHEELS = [("typing-extensions", None)]  # mujoco and typeguard (>= 4.14) import it; torch brings one
REPACK_WHEELS = ("mujoco-",)  # recompressed with LZMA (repack_wheel): same files, 1.6 MiB less to carry
DEBS = ["libegl1", "libglvnd0", "libopengl0", "libgl1", "libglx0", "libgles2"]
MESH_OR_TEXTURE = re.compile(r'<(\w+)\b[^>]*?\bfile="([^"]+)"')
TAR_MTIME = 1_700_000_000  # fixed: the tarball depends only on its contents


def _pin(dist: str, version: str | None) -> str:
    if version is None:
        try:
            import importlib.metadata

            version = importlib.metadata.version(dist)
        except Exception:  # noqa: BLE001 - not installed here: newest
            return dist
    return f"{dist}=={version}"


# --- 1. which files the tasks use ---------------------------------------------------------------------------

class _Collected(Exception):
    """Raised where envs.libero is about to compile the model XML: the XML is all we need."""


def collect(suites: list[str], full_build: bool = False) -> dict:
    """Build every task of `suites` and return {"opened": paths read by Python, "model_files": {path: tag}}.
    Paths are absolute and normalised (not resolved: LIBERO's assets folder is usually a symlink)."""
    opened: set[str] = set()
    model_files: dict[str, str] = {}
    real_open, real_io_open = builtins.open, io.open

    def record(file):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.add(os.path.normpath(os.path.abspath(os.fsdecode(file))))

    def traced_open(file, *args, **kwargs):
        record(file)
        return real_open(file, *args, **kwargs)

    def traced_io_open(file, *args, **kwargs):
        record(file)
        return real_io_open(file, *args, **kwargs)

    real_cap = L.cap_textures

    def capture(xml: str, max_size: int) -> str:
        for tag, path in MESH_OR_TEXTURE.findall(xml):
            if not os.path.isabs(path):
                raise RuntimeError(f"relative <{tag} file={path!r}> in a model XML: the bundle cannot place it")
            model_files[os.path.normpath(path)] = tag
        if not full_build:
            raise _Collected
        return real_cap(xml, max_size)

    L.ensure_libero_config()  # _TaskSim alone does not (LiberoEnv does): LIBERO would prompt with input()
    builtins.open, io.open, L.cap_textures = traced_open, traced_io_open, capture
    try:
        for suite in suites:
            start = time.perf_counter()
            names = L._suite_task_names(suite)
            for task_id, name in enumerate(names):
                if full_build:
                    env = L.LiberoEnv(suite, image_size=64, seed=0, only_task=task_id, init_states="fixed",
                                      init_state_index=0)
                    try:
                        env.reset()
                        env.step_chunk(L.np.zeros((4, 7)))
                    finally:
                        env.close()
                else:
                    try:
                        L._TaskSim(suite, name, 32, ("image",), L.LiberoOptions()).close()
                    except _Collected:
                        pass
            print(f"  traced {suite}: {len(names)} tasks ({time.perf_counter() - start:.1f} s)", flush=True)
    finally:
        builtins.open, io.open, L.cap_textures = real_open, real_io_open, real_cap
    return {"opened": sorted(opened), "model_files": model_files}


# --- 2. the tarball ----------------------------------------------------------------------------------------

class Layout:
    """Where installed files go inside the bundle (paths relative to the unpacked folder)."""

    def __init__(self):
        import libero
        import robosuite

        self.robosuite = os.path.dirname(os.path.abspath(robosuite.__file__))
        self.libero_pkg = os.path.dirname(os.path.abspath(libero.__file__))
        self.libero_root = L.libero_root()
        self.assets_link = os.path.join(self.libero_root, "assets")
        self.assets_real = os.path.realpath(self.assets_link)
        self.robosuite_assets = os.path.join(self.robosuite, "models", "assets")

    def place(self, path: str) -> str | None:
        """Bundle path of an installed file, None if it is not part of libero/robosuite."""
        for base, dest in ((self.assets_link, "libero/libero/assets"), (self.assets_real, "libero/libero/assets"),
                           (self.robosuite, "robosuite"), (self.libero_pkg, "libero")):
            if path.startswith(base + os.sep):
                return dest + "/" + os.path.relpath(path, base).replace(os.sep, "/")
        return None


def _code_files(top: str, dest: str, skip: list[str]) -> dict[str, str]:
    """Every file under `top` except __pycache__ and the `skip` subtrees: {bundle path: source}."""
    out = {}
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and os.path.join(folder, d) not in skip)
        for name in files:
            if name.endswith((".pyc", ".pyo")):
                continue
            src = os.path.join(folder, name)
            out[dest + "/" + os.path.relpath(src, top).replace(os.sep, "/")] = src
    return out


def _dist_info(dist: str, dest_prefix: str = "") -> dict[str, str]:
    import importlib.metadata

    d = importlib.metadata.distribution(dist)
    folder = str(d._path)  # noqa: SLF001 - the .dist-info folder
    return {dest_prefix + os.path.basename(folder) + "/" + name: os.path.join(folder, name)
            for name in sorted(os.listdir(folder)) if name in ("METADATA", "top_level.txt", "WHEEL", "INSTALLER")}


def plan_files(suites: list[str], traced: dict, layout: Layout) -> tuple[dict[str, str], dict[str, str]]:
    """{bundle path: source path} for the tarball, and the texture files to cap {bundle path: source}."""
    files = {}
    files.update(_code_files(layout.robosuite, "robosuite", [layout.robosuite_assets]))
    files.update(_code_files(layout.libero_pkg, "libero", [os.path.join(layout.libero_root, d) for d in
                                                           ("assets", "init_files", "bddl_files")]))
    files.update(_dist_info("robosuite"))
    files.update(_dist_info("libero"))
    for suite in suites:
        for name in L._suite_task_names(suite):
            for kind, ext in (("bddl_files", ".bddl"), ("init_files", ".pruned_init")):
                src = os.path.join(layout.libero_root, kind, suite, name + ext)
                if not os.path.isfile(src):
                    raise FileNotFoundError(src)
                files[f"libero/libero/{kind}/{suite}/{name}{ext}"] = src
    textures = {}
    used = [(p, None) for p in traced["opened"]] + list(traced["model_files"].items())
    for path, tag in used:
        dest = layout.place(path)
        if dest is None:
            if tag is not None:
                raise RuntimeError(f"<{tag} file={path}> lies outside libero/robosuite: cannot bundle it")
            continue  # cv2's config, matplotlibrc, ...: not ours
        if not os.path.isfile(path) or "/__pycache__/" in dest:
            continue  # a probe of a missing file; bytecode or numba's cache (robosuite's jitted functions)
        files[dest] = path
        if tag == "texture":
            textures[dest] = path
    return files, textures


def texture_bytes(src: str, max_size: int) -> tuple[bytes, bool]:
    """The bytes to carry for a texture: envs/libero.py's own capped copy (same pixels as it uses) if the
    texture is larger than max_size, else the file itself."""
    if not max_size:
        return open(src, "rb").read(), False
    capped = L.capped_texture(src, max_size)
    with open(capped, "rb") as f:
        return f.read(), capped != src


def png_for_xz(data: bytes) -> bytes:
    """The same image as a PNG with stored (uncompressed) deflate blocks: xz then compresses the textures to
    ~75% of their PNG size (they are a third of the bundle's raw size and most of its compressed size).
    Lossless: kept only where the decoded pixels, mode and palette/transparency equal the original's; on the
    GPU machine the files are bigger on disk and load faster."""
    from PIL import Image
    import numpy as np

    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG" or im.mode not in ("RGB", "RGBA", "L", "LA", "P"):
            return data
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=0)
        with Image.open(io.BytesIO(buf.getvalue())) as new:
            same = (new.mode == im.mode and new.size == im.size
                    and np.array_equal(np.asarray(new), np.asarray(im))
                    and np.array_equal(np.asarray(new.convert("RGBA")), np.asarray(im.convert("RGBA"))))
    return buf.getvalue() if same else data


def write_tarball(out: str, files: dict[str, str], textures: dict[str, str], max_size: int,
                  store_png: bool = True) -> dict:
    """Writes the xz tarball; returns per-group byte counts (raw) and texture stats."""
    groups: dict[str, list[int]] = {}
    capped = linked = 0
    first_copy: dict[bytes, str] = {}
    tmp = out + ".tmp"
    # preset 9: 64 MiB dictionary; one thread, ~1 MB/s on this busy machine
    with tarfile.open(tmp, "w:xz", preset=9, format=tarfile.PAX_FORMAT) as tar:
        for dest in sorted(files):
            src = files[dest]
            if dest in textures:
                data, was_capped = texture_bytes(src, max_size)
                capped += was_capped
                if store_png:
                    data = png_for_xz(data)
            else:
                with open(src, "rb") as f:
                    data = f.read()
            info = tarfile.TarInfo(dest)
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = TAR_MTIME, 0o644, 0, 0, "", ""
            digest = hashlib.sha256(data).digest()
            if digest in first_copy and len(data) >= 4096:  # LIBERO ships some meshes/textures twice (9 MiB): a hard link instead
                info.type, info.linkname = tarfile.LNKTYPE, first_copy[digest]
                tar.addfile(info)
                linked += 1
            else:
                first_copy[digest] = dest
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            parts = dest.split("/")
            key = ("/".join(parts[:4]) if dest.startswith(("libero/libero/assets/", "robosuite/models/assets/"))
                   else "/".join(parts[:3]) if dest.startswith("libero/libero/") else parts[0] + " (code)")
            g = groups.setdefault(key, [0, 0])
            g[0] += 1
            g[1] += len(data)
    os.replace(tmp, out)
    return {"groups": groups, "capped_textures": capped, "textures": len(textures), "hard_links": linked}


# --- 3. wheels and debs --------------------------------------------------------------------------------------

def _pip(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def fetch_wheels(out: str) -> list[str]:
    """Downloads (or builds) the wheels into a scratch folder and moves them to out/ and out/extra/."""
    with tempfile.TemporaryDirectory(prefix="libero_wheels_") as scratch:
        main_dir, extra_dir = os.path.join(scratch, "main"), os.path.join(scratch, "extra")
        _pip(["download", "--no-deps", "--only-binary=:all:", *PY_TARGET, "-d", main_dir,
              *(_pin(d, v) for d, v in WHEELS + PROJECT_WHEELS)])
        _pip(["wheel", "--no-deps", "-w", main_dir, *(_pin(d, v) for d, v in BUILT_WHEELS)])
        _pip(["download", "--no-deps", "--only-binary=:all:", *PY_TARGET, "-d", extra_dir,
              *(_pin(d, v) for d, v in EXTRA_WHEELS)])
        for whl in glob.glob(os.path.join(main_dir, "*.whl")):
            tag = os.path.basename(whl)[:-4].split("-")[-3:]
            if tag[0] not in ("py3", "py2.py3", "cp312") or not (tag[2] == "any" or "x86_64" in tag[2]):
                raise RuntimeError(f"{whl}: not a wheel for CPython 3.12 on x86_64 Linux")
        names = []
        for folder, dest in ((main_dir, out), (extra_dir, os.path.join(out, "extra"))):
            os.makedirs(dest, exist_ok=True)
            for whl in sorted(glob.glob(os.path.join(folder, "*.whl"))):
                shutil.move(whl, os.path.join(dest, os.path.basename(whl)))
                names.append(os.path.relpath(os.path.join(dest, os.path.basename(whl)), out))
    return names


def repack_wheel(path: str) -> bool:
    """Rewrites a wheel with LZMA-compressed zip members instead of deflate (mujoco: 6.4 -> 4.8 MiB). The
    members' bytes, names, order, dates and modes are unchanged (so RECORD's hashes still hold); pip reads
    it with the standard zipfile module. Returns False where it already was LZMA."""
    import zipfile

    with zipfile.ZipFile(path) as zin:
        if all(i.compress_type == zipfile.ZIP_LZMA for i in zin.infolist()):
            return False
        tmp = path + ".tmp"
        with zipfile.ZipFile(tmp, "w") as zout:
            for info in zin.infolist():
                new = zipfile.ZipInfo(info.filename, info.date_time)
                new.external_attr, new.create_system = info.external_attr, info.create_system
                new.compress_type = zipfile.ZIP_LZMA
                zout.writestr(new, zin.read(info))
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(tmp) as new:
        if [(i.filename, i.CRC, i.file_size) for i in old.infolist()] != \
                [(i.filename, i.CRC, i.file_size) for i in new.infolist()] or new.testzip() is not None:
            os.unlink(tmp)
            raise RuntimeError(f"repacking {path} changed its contents")
    os.replace(tmp, path)
    return True


def fetch_debs(out: str) -> list[str]:
    dest = os.path.join(out, "debs")
    os.makedirs(dest, exist_ok=True)

    def download():
        return subprocess.run(["apt-get", "download", *(f"{d}:amd64" for d in DEBS)], cwd=dest,
                              capture_output=True, text=True)

    result = download()
    if result.returncode:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = download()
        if result.returncode:
            raise RuntimeError(f"apt-get download failed:\n{result.stderr[-2000:]}")
    return sorted(os.path.join("debs", n) for n in os.listdir(dest) if n.endswith(".deb"))


# --- build ---------------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(out: str, suites: list[str], max_size: int, full_build: bool, skip_downloads: bool) -> None:
    start = time.perf_counter()
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    print(f"tracing the files of {len(suites)} suites ({'full builds' if full_build else 'model XML only'})")
    traced = collect(suites, full_build)
    layout = Layout()
    files, textures = plan_files(suites, traced, layout)
    robosuite_assets = sorted(d for d in files if d.startswith("robosuite/models/assets/"))
    print(f"  {len(files)} files, {len(traced['model_files'])} mesh/texture files, robosuite assets used: "
          + ", ".join(sorted({"/".join(d.split("/")[3:5]) for d in robosuite_assets})))

    keep = {"sim.tar.xz", "manifest.json"}
    if not skip_downloads:
        for stale in glob.glob(os.path.join(out, "*.whl")) + glob.glob(os.path.join(out, "extra", "*.whl")) \
                + glob.glob(os.path.join(out, "debs", "*.deb")):
            os.unlink(stale)
        wheels = fetch_wheels(out)
        debs = fetch_debs(out)
    else:
        wheels = sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "*.whl"))
                        + glob.glob(os.path.join(out, "extra", "*.whl")))
        debs = sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "debs", "*.deb")))
        if not wheels or not debs:
            raise SystemExit(f"--skip-downloads: no wheels/debs in {out} yet")
    for rel in wheels:
        if os.path.basename(rel).startswith(REPACK_WHEELS) and repack_wheel(os.path.join(out, rel)):
            print(f"  {rel}: members recompressed with LZMA (contents unchanged)")
    keep |= set(wheels) | set(debs)
    for folder, _, names in os.walk(out):  # the bundle travels whole: nothing else may stay in it
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), out)
            if rel not in keep:
                os.unlink(os.path.join(folder, name))

    print(f"writing sim.tar.xz (xz -9, textures capped at {max_size or 'no cap'} px) ...", flush=True)
    t = time.perf_counter()
    tar_path = os.path.join(out, "sim.tar.xz")
    stats = write_tarball(tar_path, files, textures, max_size)
    print(f"  done in {time.perf_counter() - t:.0f} s")

    import importlib.metadata

    manifest = {
        "suites": suites,
        "tasks": sum(len(L._suite_task_names(s)) for s in suites),
        "max_texture_size": max_size,
        "versions": {d: importlib.metadata.version(d) for d in ("libero", "robosuite", "mujoco", "bddl")},
        "traced_with": "full builds" if full_build else "model XML",
        "tarball_files": len(files),
        "tarball_raw_bytes": sum(g[1] for g in stats["groups"].values()),
        "textures": stats["textures"],
        "textures_capped": stats["capped_textures"],
        "files": {rel: {"bytes": os.path.getsize(os.path.join(out, rel)), "sha256": _sha256(os.path.join(out, rel))}
                  for rel in sorted({"sim.tar.xz", *wheels, *debs})},
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)

    mib = 1 << 20
    print("\nsim.tar.xz contents (bytes in the tar, before xz; textures as stored PNGs):")
    for key, (n, size) in sorted(stats["groups"].items(), key=lambda kv: -kv[1][1]):
        print(f"  {size / mib:7.2f} MiB {n:5d} files  {key}")
    print(f"  {manifest['tarball_raw_bytes'] / mib:7.2f} MiB {len(files):5d} files  total; "
          f"{stats['capped_textures']} of {stats['textures']} textures capped to {max_size} px, "
          f"{stats['hard_links']} duplicate files stored as hard links")
    print("\nbundle (what travels):")
    total = 0
    for rel, meta in manifest["files"].items():
        total += meta["bytes"]
        print(f"  {meta['bytes'] / mib:7.2f} MiB  {rel}")
    total += os.path.getsize(os.path.join(out, "manifest.json"))
    print(f"  {total / mib:7.2f} MiB  total ({out}); suites: {', '.join(suites)} "
          f"({manifest['tasks']} tasks); {time.perf_counter() - start:.0f} s")
    if total > 55 * mib:
        print(f"WARNING: {total / mib:.1f} MiB is over the 55 MiB aim (64 MiB per call, code included): "
              "build fewer suites (--suites) or stage the bundle on a warm machine")


# --- verification (here, no GPU) ------------------------------------------------------------------------------

# What the GPU machine has (its image, platform.md) plus what the bundle's wheels install. Everything else
# in this machine's site-packages (libero, robosuite, the asset wheels, torch, ...) is invisible to the
# child, which runs with `python -S`.
ISOLATED_DISTS = ["numpy", "scipy", "opencv-python-headless", "pyyaml", "pillow", "matplotlib", "contourpy",
                  "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "packaging", "six",
                  "cloudpickle", "numba", "llvmlite", "absl-py", "typing-extensions",
                  "mujoco", "pyopengl", "glfw", "gymnasium", "farama-notifications", "easydict", "future",
                  "termcolor", "bddl"]

CHILD = r'''
import json, os, re, sys, time
mode, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
import envs.libero as L
import numpy as np
result = {}
if mode == "trace":  # every task: robosuite/LIBERO parse their XMLs (Python), and every mesh/texture exists
    from envs import libero_bundle as B
    suites = sys.argv[3:]
    traced = B.collect(suites)
    missing = [p for p in traced["model_files"] if not os.path.isfile(p)]
    result = {"tasks": sum(len(L._suite_task_names(s)) for s in suites), "model_files": len(traced["model_files"]),
              "missing": missing, "outside": [p for p in traced["model_files"]
                                              if not p.startswith(os.environ.get("SIM_DIR", "/nonexistent"))]}
elif mode == "run":
    suite, task, size = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    env = L.LiberoEnv(suite, image_size=size, seed=0, only_task=task, init_states="fixed", init_state_index=0,
                      wrist_camera=True)
    obs0 = env.reset()
    rng = np.random.default_rng(0)
    obs, reward, term, trunc, info = env.step_chunk(rng.uniform(-1, 1, (8, 7)))
    np.savez(out + ".npz", image0=obs0["image"], wrist0=obs0["wrist"], image=obs["image"], wrist=obs["wrist"],
             proprio=obs["proprio"], qpos=env.sim.sim.data.qpos.copy())
    env.close()
    result = {"steps": info["env_steps"]}
elif mode == "stock":
    from libero.libero.envs import OffScreenRenderEnv
    suite, task = sys.argv[3], int(sys.argv[4])
    name = L._suite_task_names(suite)[task]
    env = OffScreenRenderEnv(bddl_file_name=os.path.join(L.libero_root(), "bddl_files", suite, name + ".bddl"),
                             camera_heights=64, camera_widths=64)
    env.seed(0)
    o = env.reset()
    o, r, d, i = env.step([0, 0, 0, 0, 0, 0, -1])
    result = {"agentview": list(o["agentview_image"].shape), "wrist": list(o["robot0_eye_in_hand_image"].shape)}
    env.close()
import libero, robosuite, mujoco
result["origins"] = {m.__name__: m.__file__ for m in (libero, robosuite, mujoco)}
result["libero_root"] = L.libero_root()
result["capped_cache"] = L.texture_cache_dir(1024)
stdlib = os.path.dirname(os.__file__)
roots = [p for p in sys.path if p and os.path.isdir(p)]
result["foreign_modules"] = sorted(
    name for name, m in list(sys.modules.items())
    if getattr(m, "__file__", None) and not any(os.path.abspath(m.__file__).startswith(os.path.abspath(r) + os.sep)
                                                 for r in roots))
result["seconds"] = time.perf_counter() - t0
json.dump(result, open(out + ".json", "w"))
'''


def _isolated_site(dest: str) -> None:
    """Symlinks to the top-level entries of ISOLATED_DISTS in this machine's site-packages."""
    import importlib.metadata

    os.makedirs(dest, exist_ok=True)
    for dist in ISOLATED_DISTS:
        d = importlib.metadata.distribution(dist)
        base = str(d.locate_file(""))
        tops = {str(f).split("/")[0] for f in (d.files or []) if not str(f).startswith("..")}
        tops.add(os.path.basename(str(d._path)))  # noqa: SLF001
        for top in tops:
            src = os.path.join(base, top)
            if os.path.exists(src) and not os.path.lexists(os.path.join(dest, top)):
                os.symlink(src, os.path.join(dest, top))


def check_textures(sim: str) -> bool:
    """Every bundled texture, decoded by MuJoCo, equals what a full install decodes from envs/libero.py's
    capped copy of the original (all 57, not only those of the tasks run)."""
    import mujoco
    import numpy as np

    layout = Layout()
    worst, count, bad = 0, 0, []
    for folder, _, names in os.walk(sim):
        for name in names:
            if not name.endswith(".png"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, sim).replace(os.sep, "/")
            if rel.startswith("libero/libero/assets/"):
                orig = os.path.join(layout.assets_link, rel[len("libero/libero/assets/"):])
            else:
                orig = os.path.join(layout.robosuite, rel[len("robosuite/"):])
            decoded = []
            for file in (path, L.capped_texture(orig, L.LiberoOptions.max_texture_size)):
                model = mujoco.MjModel.from_xml_string(
                    f'<mujoco><asset><texture name="t" type="2d" file="{file}"/></asset></mujoco>')
                decoded.append((int(model.tex_width[0]), int(model.tex_height[0]), model.tex_data.copy()))
            (w0, h0, a), (w1, h1, b) = decoded
            count += 1
            if (w0, h0) != (w1, h1) or a.shape != b.shape:
                bad.append(rel)
                continue
            diff = int(np.abs(a.astype(int) - b.astype(int)).max())
            worst = max(worst, diff)
            if diff:
                bad.append(rel)
    print(f"textures: {count} bundled PNGs decoded by MuJoCo vs the full install's capped copies: "
          f"max abs diff {worst}, {len(bad)} differ {bad[:5]}")
    return not bad and count > 0


def verify(bundle: str, tasks_per_suite: int, size: int) -> bool:
    import numpy as np

    bundle = os.path.abspath(bundle)
    with open(os.path.join(bundle, "manifest.json")) as f:
        manifest = json.load(f)
    work = tempfile.mkdtemp(prefix="libero_bundle_verify_")
    sim, site = os.path.join(work, "sim"), os.path.join(work, "site")
    t = time.perf_counter()
    with tarfile.open(os.path.join(bundle, "sim.tar.xz")) as tar:
        tar.extractall(sim, filter="data")
    print(f"unpacked sim.tar.xz into {sim} ({time.perf_counter() - t:.0f} s)")
    _isolated_site(site)
    child = os.path.join(work, "child.py")
    with open(child, "w") as f:
        f.write(CHILD)
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LIBERO_CONFIG_PATH",
                                                                  "ACCERL_CACHE_DIR", "PYTHONHOME")}
    base_env.update(MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl", PYTHONDONTWRITEBYTECODE="1")
    bundled_env = dict(base_env, PYTHONPATH=os.pathsep.join([sim, site, ROOT]), SIM_DIR=sim,
                       LIBERO_CONFIG_PATH=os.path.join(work, "libero_config"),
                       ACCERL_CACHE_DIR=os.path.join(work, "cache"), HOME=os.path.join(work, "home"))
    full_env = dict(base_env, PYTHONPATH=ROOT)

    def run(env, isolated, *args):
        out = os.path.join(work, "_".join(map(str, args)) + ("_bundle" if isolated else "_full"))
        cmd = [sys.executable, *(["-S"] if isolated else []), child, args[0], out, *map(str, args[1:])]
        r = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
        if r.returncode:
            print(f"FAILED: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            return None
        with open(out + ".json") as f:
            return json.load(f), out

    ok = True
    got = run(bundled_env, True, "trace", *manifest["suites"])
    if got is None:
        return False
    res = got[0]
    print(f"trace (bundle, python -S): {res['tasks']} tasks, {res['model_files']} mesh/texture files, "
          f"missing {len(res['missing'])}, outside the bundle {len(res['outside'])}; "
          f"libero from {res['origins']['libero']}, robosuite from {res['origins']['robosuite']}, "
          f"mujoco from {res['origins']['mujoco']}; modules from outside sys.path: {res['foreign_modules']}")
    ok &= not res["missing"] and not res["outside"] and res["origins"]["libero"].startswith(sim) \
        and res["origins"]["robosuite"].startswith(sim) and not res["foreign_modules"]
    for suite in manifest["suites"]:
        for task in range(tasks_per_suite):
            a, b = run(bundled_env, True, "run", suite, task, size), run(full_env, False, "run", suite, task, size)
            if a is None or b is None:
                ok = False
                continue
            x, y = np.load(a[1] + ".npz"), np.load(b[1] + ".npz")
            diffs = {k: float(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)).max()) for k in x.files}
            cache_used = os.path.isdir(os.path.join(work, "cache"))
            print(f"{suite}/{task}: bundle vs full install max abs diff "
                  + ", ".join(f"{k} {v:g}" for k, v in diffs.items())
                  + f"; image mean {x['image'].mean():.1f} std {x['image'].std():.1f}"
                  + f"; bundle run {a[0]['seconds']:.1f} s (libero {a[0]['origins']['libero']}), full "
                  f"{b[0]['seconds']:.1f} s; texture cache written by the bundle run: {cache_used}")
            ok &= all(v == 0 for v in diffs.values()) and a[0]["origins"]["libero"].startswith(sim) \
                and not a[0]["foreign_modules"] and not cache_used
    ok &= check_textures(sim)
    got = run(bundled_env, True, "stock", manifest["suites"][0], 0)
    if got is None:
        ok = False
    else:
        print(f"stock OffScreenRenderEnv (bundle): {got[0]['agentview']} + {got[0]['wrist']} images "
              f"({got[0]['seconds']:.1f} s)")
    print(f"verification {'PASSED' if ok else 'FAILED'} (scratch folder {work})")
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, ".bundle"), help="bundle folder (default .bundle)")
    parser.add_argument("--suites", nargs="+", default=ALL_SUITES, choices=ALL_SUITES)
    parser.add_argument("--max-texture-size", type=int, default=L.LiberoOptions.max_texture_size)
    parser.add_argument("--full-build", action="store_true", help="trace with full builds (slow)")
    parser.add_argument("--skip-downloads", action="store_true", help="reuse the wheels/debs already in --out")
    parser.add_argument("--verify", metavar="BUNDLE", help="check a built bundle here instead of building")
    parser.add_argument("--verify-tasks", type=int, default=1, help="tasks per suite to run in --verify")
    parser.add_argument("--verify-size", type=int, default=128)
    args = parser.parse_args()
    if args.verify:
        sys.exit(0 if verify(args.verify, args.verify_tasks, args.verify_size) else 1)
    build(args.out, args.suites, args.max_texture_size, args.full_build, args.skip_downloads)


if __name__ == "__main__":
    main()
