# LIBERO on the GPU machine (no registry there): install the bundle built by `python -m envs.libero_bundle`.
#
#   source envs/libero_gpu_setup.sh [BUNDLE_DIR]      # from the repo root; BUNDLE_DIR default .bundle
#
# Source it (it exports variables into your shell); it never exits the shell, and returns 1 on failure.
# Idempotent: on a reused machine it checks stamps (the sha256 of the bundle's manifest.json) and only
# re-exports; a different bundle is installed afresh. What it does (platform.md, "LIBERO on the GPU machine"):
# 1. wheels -> $LIBERO_SITE (/tmp/site): pip install --no-index --no-deps --no-compile --target
#    (typing_extensions from extra/ only where Python lacks it or has one older than typeguard's 4.14);
# 2. sim.tar.xz -> $LIBERO_SIM (/tmp/sim): robosuite/ and libero/ (with its pruned assets at
#    libero/libero/assets, which is where envs/libero.py and LIBERO look);
# 3. Debian's libglvnd debs (the image has no libEGL.so.1): `dpkg -x` into / and ldconfig as root, else into
#    /tmp/libero_gl with LD_LIBRARY_PATH (LIBERO_GL_ROOT=<dir> forces that);
# 4. exports PYTHONPATH=$LIBERO_SITE:$LIBERO_SIM:<repo>:..., MUJOCO_GL=egl, PYOPENGL_PLATFORM=egl,
#    __EGL_VENDOR_LIBRARY_FILENAMES (NVIDIA's EGL vendor file), LIBERO_CONFIG_PATH=/tmp/libero_config
#    (config.yaml written there: LIBERO otherwise prompts with input());
# 5. checks that libero/robosuite/mujoco import from there (and tyro, h5py at all) and prints the GL renderer
#    of an EGL context (skip with LIBERO_SETUP_CHECK=0).
# Then e.g.: python3 -m envs.libero_setup --smoke ; python3 benchmarks/libero_speed.py
# Several GPUs: pass LiberoEnv(egl_device_id=...) per worker (MUJOCO_EGL_DEVICE_ID).

_libero_setup() {
    local bundle="${1:-${LIBERO_BUNDLE:-.bundle}}"
    local py="${PYTHON:-python3}"
    local site="${LIBERO_SITE:-/tmp/site}" sim="${LIBERO_SIM:-/tmp/sim}" cfg="${LIBERO_CONFIG_DIR:-/tmp/libero_config}"
    local repo key t0 f
    repo="$(pwd)"
    t0=$(date +%s)
    if [ ! -f "$repo/envs/libero.py" ]; then
        echo "libero_gpu_setup: source me from the repo root (no envs/libero.py in $repo)" >&2; return 1
    fi
    if [ ! -f "$bundle/manifest.json" ] || [ ! -f "$bundle/sim.tar.xz" ]; then
        echo "libero_gpu_setup: no bundle in '$bundle' (build it with python -m envs.libero_bundle --out .bundle" \
             "and carry .bundle)" >&2; return 1
    fi
    bundle="$(cd "$bundle" && pwd)"
    key="$(sha256sum "$bundle/manifest.json" | cut -c1-64)"

    # 1. wheels
    if [ "$(cat "$site/.libero_bundle" 2>/dev/null)" != "$key" ]; then
        rm -rf "$site.tmp"
        local wheels=("$bundle"/*.whl)
        if ! "$py" -c "import importlib.metadata as m, sys; import typing_extensions
sys.exit(tuple(map(int, m.version('typing_extensions').split('.')[:2])) < (4, 14))" 2>/dev/null; then
            wheels+=("$bundle"/extra/typing_extensions-*.whl)
        fi
        if "$py" -m pip --version >/dev/null 2>&1; then
            if ! "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
                    --target "$site.tmp" "${wheels[@]}"; then
                echo "libero_gpu_setup: pip install of the wheels failed" >&2; return 1
            fi
        else  # no pip: a wheel is a zip; its *.data/purelib|platlib go to the top (scripts are not needed)
            "$py" - "$site.tmp" "${wheels[@]}" <<'PYEOF' || { echo "libero_gpu_setup: unpacking the wheels failed" >&2; return 1; }
import os, shutil, sys, zipfile
target = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
        for data in {n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".data")}:
            for kind in ("purelib", "platlib"):
                src = os.path.join(target, data, kind)
                if os.path.isdir(src):
                    shutil.copytree(src, target, dirs_exist_ok=True)
            shutil.rmtree(os.path.join(target, data))
for root, _, files in os.walk(target):  # extension modules need their exec bit back
    for f in files:
        if ".so" in f:
            os.chmod(os.path.join(root, f), 0o755)
PYEOF
        fi
        echo "$key" > "$site.tmp/.libero_bundle"
        rm -rf "$site" && mv "$site.tmp" "$site" || return 1
        echo "libero_gpu_setup: wheels installed in $site"
    fi

    # 2. simulator code and assets
    if [ "$(cat "$sim/.libero_bundle" 2>/dev/null)" != "$key" ]; then
        rm -rf "$sim.tmp" && mkdir -p "$sim.tmp" || return 1
        if ! tar -xJf "$bundle/sim.tar.xz" -C "$sim.tmp" 2>/dev/null; then  # no xz binary: Python's tarfile
            rm -rf "$sim.tmp" && mkdir -p "$sim.tmp"
            "$py" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
                "$bundle/sim.tar.xz" "$sim.tmp" || { echo "libero_gpu_setup: cannot unpack sim.tar.xz" >&2; return 1; }
        fi
        echo "$key" > "$sim.tmp/.libero_bundle"
        rm -rf "$sim" && mv "$sim.tmp" "$sim" || return 1
        echo "libero_gpu_setup: sim.tar.xz unpacked in $sim ($(du -sm "$sim" | cut -f1) MB)"
    fi

    # 3. EGL loader (libglvnd)
    local gl_root="${LIBERO_GL_ROOT:-/}" gl_stamp
    if [ "$(id -u)" != 0 ] && [ "$gl_root" = / ]; then gl_root="/tmp/libero_gl"; fi
    if [ "$gl_root" = / ]; then gl_stamp="/tmp/.libero_gl_debs"; else gl_stamp="$gl_root/.libero_gl_debs"; fi
    if [ "$(cat "$gl_stamp" 2>/dev/null)" != "$key" ]; then
        mkdir -p "$gl_root"
        for f in "$bundle"/debs/*.deb; do
            if command -v dpkg >/dev/null 2>&1; then
                dpkg -x "$f" "$gl_root" || return 1
            else  # a .deb is an ar archive holding data.tar.*
                "$py" - "$f" "$gl_root" <<'PYEOF' || return 1
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
pos = 8
while pos < len(data):
    name, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
    if name.startswith("data.tar"):
        tarfile.open(fileobj=io.BytesIO(data[pos + 60:pos + 60 + size])).extractall(sys.argv[2], filter="fully_trusted")
    pos += 60 + size + (size & 1)
PYEOF
            fi
        done
        [ "$gl_root" = "/" ] && { ldconfig 2>/dev/null || true; }
        echo "$key" > "$gl_stamp"
        echo "libero_gpu_setup: libglvnd (libEGL, libOpenGL, libGL) unpacked into $gl_root"
    fi
    if [ "$gl_root" != "/" ]; then
        case ":${LD_LIBRARY_PATH:-}:" in *":$gl_root/usr/lib/x86_64-linux-gnu:"*) ;;
            *) export LD_LIBRARY_PATH="$gl_root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
    fi
    if [ -d /usr/local/nvidia/lib64 ]; then  # where the NVIDIA container keeps libEGL_nvidia.so.0
        case ":${LD_LIBRARY_PATH:-}:" in *":/usr/local/nvidia/lib64:"*) ;;
            *) export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/nvidia/lib64" ;; esac
    fi
    local vendor=""
    for f in /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json /usr/share/glvnd/egl_vendor.d/10_nvidia.json \
             /etc/glvnd/egl_vendor.d/10_nvidia.json; do
        if [ -f "$f" ]; then vendor="$f"; break; fi
    done
    if [ -n "$vendor" ]; then
        export __EGL_VENDOR_LIBRARY_FILENAMES="$vendor"
    else
        echo "libero_gpu_setup: WARNING no NVIDIA EGL vendor file (10_nvidia.json): EGL may not find the GPU" >&2
    fi

    # 4. environment
    local p rest="" old_ifs="$IFS"
    IFS=:
    for p in ${PYTHONPATH:-}; do  # drop earlier copies of our entries (re-sourcing keeps one of each)
        case "$p" in ""|"$site"|"$sim"|"$repo") ;; *) rest="${rest:+$rest:}$p" ;; esac
    done
    IFS="$old_ifs"
    export PYTHONPATH="$site:$sim:$repo${rest:+:$rest}"
    export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
    export LIBERO_CONFIG_PATH="$cfg"
    export ACCERL_CACHE_DIR="${ACCERL_CACHE_DIR:-/tmp/accerl_cache}"
    mkdir -p "$cfg" || return 1
    printf '%s\n' "benchmark_root: $sim/libero/libero" "bddl_files: $sim/libero/libero/bddl_files" \
        "init_states: $sim/libero/libero/init_files" "datasets: $sim/libero/datasets" \
        "assets: $sim/libero/libero/assets" > "$cfg/config.yaml.$$" && mv "$cfg/config.yaml.$$" "$cfg/config.yaml"

    # 5. check
    if [ "${LIBERO_SETUP_CHECK:-1}" != 0 ]; then
        local out rc
        out="$("$py" - "$sim" "$bundle" 2>&1 <<'PYEOF'
import json, os, sys
sim, bundle = sys.argv[1], sys.argv[2]
import envs.libero as L  # sets MUJOCO_GL before mujoco
import mujoco, robosuite, libero
import h5py, tyro  # demos.py and every entry script (tyro: a bundled wheel; h5py: the image's)
bad = [m.__name__ for m in (robosuite, libero) if not m.__file__.startswith(sim + "/")]
if bad or not os.path.isdir(os.path.join(L.libero_root(), "assets", "scenes")):
    sys.exit(f"{bad or 'assets'} not from {sim}: PYTHONPATH={os.environ.get('PYTHONPATH')}")
ctx = mujoco.GLContext(16, 16)
ctx.make_current()
from OpenGL import GL
renderer = GL.glGetString(GL.GL_RENDERER).decode()
ctx.free()
suites = json.load(open(os.path.join(bundle, "manifest.json")))["suites"]
print(f"libero_gpu_setup: mujoco {mujoco.__version__}, robosuite {robosuite.__version__}, libero from "
      f"{os.path.dirname(libero.__file__)}; suites {', '.join(suites)}; GL_RENDERER {renderer}")
if "llvmpipe" in renderer.lower() or "mesa" in renderer.lower():
    print("libero_gpu_setup: WARNING rendering on the CPU, not the GPU")
PYEOF
)"
        rc=$?
        printf '%s\n' "$out" | grep -v "robosuite WARNING"
        if [ "$rc" != 0 ]; then echo "libero_gpu_setup: check FAILED" >&2; return 1; fi
    fi
    echo "libero_gpu_setup: ready ($(( $(date +%s) - t0 )) s)"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "libero_gpu_setup: source this file (source envs/libero_gpu_setup.sh), do not run it" >&2
    exit 1
fi
_libero_setup "$@"
_libero_setup_rc=$?
unset -f _libero_setup
return "$_libero_setup_rc"
