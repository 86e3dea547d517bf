"""Scripted LIBERO experts: privileged simulator state in, chunks of the adapter's normalised actions out.

    python -m envs.libero_experts --suite libero_spatial --episodes-per-task 10    # success per task
    python demos.py collect --task libero_spatial/3 --episodes 50 --workers 2       # demos from the expert

What the expert reads (privileged, never shown to a policy): the task's goal (LIBERO's parsed BDDL problem,
`parsed_problem["goal_state"]`; `parse_bddl` reads the same list from the file without the simulator),
object, fixture and region poses and the collision geometry from the MuJoCo model and data, the goal
predicates through LIBERO's own `_eval_predicate`, and finger contacts. What it writes: actions in the
space `LiberoEnv.step` takes (envs/libero.py: dims 0-5 normalised with the suite's OpenVLA q01/q99 into
the env's own OSC_POSE controller, dim 6 > 0 closes), so its demonstrations feed behaviour cloning as is.

Skills: every goal predicate (On obj target) / (In obj region) with a graspable obj is a pick and place,
done in the BDDL's order (one that already holds is skipped, one that still fails is retried, at most
MAX_ATTEMPTS times). Pick: a top-down grasp chosen among candidates by a cost in env steps (turning is
slow: the suites' action statistics cap the yaw rate at 0.01-0.04 rad per step), rejecting grasps where
the descending hand or fingers would hit another collision geom or the arm would over-reach; boxes are
closed on across their short side (off centre when neighbours crowd the middle), cans and bottles
anywhere, bowls and mugs on the rim (one finger inside the wall, on the middle of one of its collision
pieces: a pinch across the seam between two pieces slips). Place: the object (not the hand) is carried over
the target (an object's origin, as LIBERO's On wants within 3 cm, or a region's centre) along waypoints
that clear every geom on the way within the arm's reach, lowered until it is DROP_M above what will
support it (or until the palm would touch a basket's rim), and let go. A missed grasp or a dropped object
(finger contacts and the object's height relative to the hand, checked at every chunk) restarts the task
from the true state. Unsupported predicates (`skill_for`): drawers, the stove's knob, plates, moka pots,
the book and caddy, the microwave; `unsupported_reason` says why for a task.

Motion: chunk by chunk, open loop inside a chunk as the policy acts (chunk_len=1 is closed loop): a P
controller on the grip site's position and on the closing axis' yaw (the hand kept pointing down), run
against a first-order model of how OSC_POSE tracks a delta command (measured on libero_spatial: the hand
covers ~0.26 of the commanded displacement per step at steady state, ~0.24 of a commanded rotation, with
a one-step lag), re-synced to the true state at the next chunk. The arm's reach is modelled from the
Panda's geometry (REACH_M): far objects are grasped on their near side, carries stay low enough to reach.

Measured with this command (2-core CPU, fixed initial states 0-9 of every task, chunk 8, no noise; episodes
step the env without rendering, `LiberoEnv.step_unobserved`, ~4 s each): libero_spatial 98 % (100 % on 9
tasks, 80 % on task 4, the bowl in the drawer, whose walls leave no collision-free rim grasp in 2 of its
states), mean 94-160 steps of 220; libero_object 100 % on all 10 tasks, 106-127 steps of 280; libero_goal
100 % on its 6 pick-and-place tasks (1, 2, 4, 6, 8, 9), 89-113 steps of 300; libero_10 100 % on its 5
pick-and-place tasks (0, 1, 4, 6, 7), 210-249 steps of 520. With noise 0.1, 3 states per task: 100 % on
libero_spatial and libero_object. Unsupported: libero_goal 0, 3, 5, 7 and libero_10 2, 3, 5, 8, 9.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import numpy as np

# Import order: envs.libero sets MUJOCO_GL before anything imports mujoco (see its module docstring).
from envs.libero import OPENVLA_ACTION_STATS, SUITES, _suite_task_names, libero_root

# --- the OSC_POSE controller as the expert models it (measured on libero_spatial, see the docstring) ------
OSC_POS_M = 0.05
"""Controller units -> metres of commanded displacement (robosuite's OSC_POSE output_max for x, y, z)."""
OSC_ROT_RAD = 0.5
"""Controller units -> radians of commanded rotation (output_max for the rotation dims)."""
TRACK_POS = 0.26
"""Steady-state hand displacement per step / commanded displacement (kp 150, critically damped)."""
TRACK_ROT = 0.24
LAG = 0.5
"""First-order lag of the tracked velocity: v <- (1 - LAG) v + LAG * TRACK * command."""
TYPICAL_SPEED_M = 0.008
"""Metres per step the hand moves on a long way (the speed cap is ~0.01 with OpenVLA's statistics)."""
GAIN_POS = 0.3
"""P gain (per step) on the position error; 0.3 settles in ~20 steps with ~1 mm overshoot on the model."""
GAIN_ROT = 0.3
GRIPPER_STEPS = 14
"""Steps for the Panda gripper to close on a thin wall, or to open, and settle (its command ramps over 8)."""
FINGER_REACH_M = 0.013
"""How far the fingertips reach below the grip site."""
PALM_CLEARANCE_M = 0.022
"""The hand's palm is 2.4 cm above the grip site: what is grasped must stay below it."""
MAX_OPENING_M = 0.07
"""Widest object side the open gripper closes around with a margin (pads 7.6 cm apart)."""
HAND_HALF_LENGTH_M = 0.105
"""The hand's half extent along the closing axis (and HAND_HALF_WIDTH_M across it), seen from above."""
HAND_HALF_WIDTH_M = 0.035
FINGER_OFFSET_M = 0.05
"""Open fingers: centred this far from the grip site along the closing axis, FINGER_HALF_M half wide."""
FINGER_HALF_M = 0.015
GRASP_EDGE_M = 0.015
"""Off-centre grasps of long boxes keep the fingers this far from the box's end."""
RIM_INSET_M = 0.008
"""Rim grasps: the grip site this far inside the outer radius (over the wall)."""
RIM_DEPTH_M = 0.02
"""Rim grasps: the grip site this far below the rim."""
SHOULDER_M = 0.333
"""Panda: shoulder (joint 2) height above the robot's base."""
WRIST_ABOVE_SITE_M = 0.208
"""Pointing down, the wrist (joint 6) is this far above the grip site and WRIST_BACK_M nearer the base
(measured; the OSC keeps that offset pointing at the base)."""
WRIST_BACK_M = 0.074
REACH_M = 0.70
"""Shoulder-to-wrist distance the arm reaches (0.719 stretched out, where the OSC stalls)."""
DROP_M = 0.01
"""A placed object is let go this far above what will support it."""
CLEARANCE_M = 0.04
"""Vertical margin over obstacles while travelling."""
OPEN_STEPS = 8
"""Steps the hand waits for the gripper to let go of a placed object."""
WAYPOINT_M = 0.04
"""Spacing of the waypoints of a move over obstacles."""
STALL_STEPS = 12
"""A move that has not come 1 mm closer for this many steps, within STALL_TOL_M of its goal, is done."""
STALL_TOL_M = 0.015
YAW_TOL = 0.1
"""Radians of yaw error accepted before descending onto a grasp."""
SLIP_M = 0.02
"""A held object that sinks this far relative to the hand counts as dropped."""
MAX_ATTEMPTS = 3
"""Tries per goal predicate before the expert gives up and holds still."""
RIM_STYLE = ("bowl", "mug", "ramekin")
"""Object categories grasped on the rim: wider than the gripper opens, with a thin wall."""


# ---------------------------------------------------------------------------------------------------------
# Goals: the BDDL problem
# ---------------------------------------------------------------------------------------------------------
def _sexpr(text: str) -> list:
    """A BDDL file as nested lists of tokens (comments after ';' dropped)."""
    tokens = re.findall(r"\(|\)|[^\s()]+", re.sub(r";[^\n]*", "", text))
    stack: list[list] = [[]]
    for token in tokens:
        if token == "(":
            stack.append([])
        elif token == ")":
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(token)
    return stack[0]


def parse_bddl(text: str) -> dict:
    """The parts of a BDDL problem the expert uses: {"goal": [(predicate, arg, ...), ...] (lower case, the
    conjunction's terms in file order, as LIBERO's `parsed_problem["goal_state"]`), "objects" and
    "fixtures": {name: category}, "language": str}."""
    (define,) = [e for e in _sexpr(text) if isinstance(e, list) and e and e[0] == "define"]
    out: dict = {"goal": [], "objects": {}, "fixtures": {}, "language": ""}
    for group in define[1:]:
        if not isinstance(group, list) or not group:
            continue
        head = group[0]
        if head in (":objects", ":fixtures"):
            names: list[str] = []
            items = group[1:]
            i = 0
            while i < len(items):
                if items[i] == "-":
                    for name in names:
                        out[head[1:]][name] = items[i + 1]
                    names, i = [], i + 2
                else:
                    names.append(items[i])
                    i += 1
        elif head == ":language":
            out["language"] = " ".join(group[1:])
        elif head == ":goal":
            (expr,) = group[1:]
            terms = expr[1:] if expr[0].lower() == "and" else [expr]
            out["goal"] = [tuple(str(x).lower() for x in term) for term in terms]
    return out


def task_problem(suite: str, task_id: int) -> dict:
    """`parse_bddl` of a suite's task (reads the installed LIBERO's BDDL file; imports nothing)."""
    name = _suite_task_names(suite)[task_id]
    with open(os.path.join(libero_root(), "bddl_files", suite, f"{name}.bddl")) as f:
        return parse_bddl(f.read())


def _region_parent(region: str, problem: dict) -> str | None:
    """"wooden_cabinet_1_top_region" -> "wooden_cabinet_1" (regions are named <parent>_<region>)."""
    for name in (*problem["fixtures"], *problem["objects"]):
        if region.startswith(name + "_"):
            return name
    return None


def _category(name: str, problem: dict) -> str:
    return problem["objects"].get(name) or problem["fixtures"].get(name) or re.sub(r"_\d+$", "", name)


UNSUPPORTED_OBJECTS = {
    "plate": "plates are wider (13.8 cm) than the open gripper (7.6 cm); pushing is not implemented",
    "moka_pot": "no grasp of the moka pot was worked out (not attempted)",
    "black_book": "the upright book and the caddy's 5.6 cm compartment were not attempted",
    "chefmate_8_frypan": "no grasp of the frying pan was worked out (not attempted)",
}
"""Object categories the pick-and-place skill refuses, and why."""
DRAWERS = ("drawers are not supported: LIBERO's handle bar sits 1.5 cm off the drawer front and a Panda finger "
           "is 1.45 cm thick, so a top-down hand cannot hook it (and the middle and bottom handles lie under the "
           "one above); pushing libero_10's bottom drawer shut stalls when the forearm meets the cabinet top (tried)")
STOVE = ("turning the stove on is not supported: pushing the knob's grip round with the fingertips was tried on "
         "libero_goal, where the knob sits next to the robot's base and the folded elbow reaches its joint limit "
         "before the knob has turned the 0.5 rad LIBERO asks for")


def _is_drawer_region(name: str, problem: dict) -> bool:
    parent = _region_parent(name, problem)
    return (parent is not None and "cabinet" in _category(parent, problem)
            and re.search(r"_(top|middle|bottom)_region$", name) is not None)


def skill_for(predicate: tuple[str, ...], problem: dict) -> tuple[str | None, str]:
    """("pick_place", "") for a goal predicate this expert can achieve, else (None, why not)."""
    kind, *args = predicate
    if kind in ("on", "in"):
        obj, target = args
        if obj not in problem["objects"]:
            return None, f"{obj} is a fixture"
        if _category(obj, problem) in UNSUPPORTED_OBJECTS:
            return None, UNSUPPORTED_OBJECTS[_category(obj, problem)]
        if _is_drawer_region(target, problem):
            return None, DRAWERS
        if "microwave" in target:
            return None, "placing inside the microwave needs a sideways insertion (not attempted)"
        return "pick_place", ""
    if kind in ("open", "close") and _is_drawer_region(args[0], problem):
        return None, DRAWERS
    if kind == "turnon" and _category(args[0], problem) == "flat_stove":
        return None, STOVE
    return None, f"({' '.join(predicate)}) is not supported"


def unsupported_reason(suite: str, task_id: int) -> str:
    """"" if the expert has a skill for every goal predicate of the task, else why not."""
    problem = task_problem(suite, task_id)
    reasons = [reason for predicate in problem["goal"] for skill, reason in [skill_for(predicate, problem)]
               if skill is None]
    return "; ".join(dict.fromkeys(reasons))


# ---------------------------------------------------------------------------------------------------------
# Small rotation helpers (world frame, 3x3 matrices)
# ---------------------------------------------------------------------------------------------------------
def _rotvec(rot: np.ndarray) -> np.ndarray:
    """Axis-angle vector of a rotation matrix."""
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    if angle < 1e-6:
        return 0.5 * axis
    if angle > math.pi - 1e-3:  # near pi: the axis is the dominant column of (R + I) / 2
        sym = (rot + np.eye(3)) / 2.0
        col = int(np.argmax(np.diag(sym)))
        axis = sym[:, col] / math.sqrt(max(sym[col, col], 1e-12))
        return axis * angle
    return axis * (angle / (2.0 * math.sin(angle)))


def _rotmat(rotvec: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(rotvec))
    if angle < 1e-9:
        return np.eye(3)
    k = rotvec / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _wrap(angle: float) -> float:
    """Angle in (-pi/2, pi/2]: the two-finger gripper is symmetric under a half turn."""
    return (angle + math.pi / 2) % math.pi - math.pi / 2


def _footprint_overlaps(center: np.ndarray, axis: np.ndarray, half_along: float, half_across: float,
                        box_center: np.ndarray, box_axes: np.ndarray) -> np.ndarray:
    """Which boxes, seen from above, overlap a rectangle (centre, unit `axis`, half sizes along and across
    it). Box g projects onto the table plane as the convex polygon spanned by its three half-axis vectors
    `box_axes[g]` (3, 2) around `box_center[g]` (2,); separating-axis test on the rectangle's two axes and
    the normals of the polygon's edges (exact for the projection)."""
    perp = np.array([-axis[1], axis[0]])
    offset = box_center - center  # (G, 2)
    normals = np.stack([-box_axes[..., 1], box_axes[..., 0]], axis=-1)  # (G, 3, 2)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    normals = np.where(length > 1e-9, normals / np.maximum(length, 1e-9), 0.0)
    apart = np.zeros(len(box_center), dtype=bool)
    for direction in (axis, perp):  # the rectangle's axes, shared by every box
        box_radius = np.abs(box_axes @ direction).sum(-1)
        rect_radius = half_along * abs(axis @ direction) + half_across * abs(perp @ direction)
        apart |= np.abs(offset @ direction) > box_radius + rect_radius
    box_radius = np.abs(np.einsum("gjk,gik->gij", box_axes, normals)).sum(-1)  # (G, 3): along each normal
    rect_radius = half_along * np.abs(normals @ axis) + half_across * np.abs(normals @ perp)
    gap = np.abs(np.einsum("gk,gik->gi", offset, normals))
    apart |= np.any((gap > box_radius + rect_radius) & (length[..., 0] > 1e-9), axis=1)
    return ~apart


# ---------------------------------------------------------------------------------------------------------
# The expert
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Belief:
    """The hand as the expert predicts it inside a chunk (the true state at the chunk's start)."""

    pos: np.ndarray
    vel: np.ndarray
    """Metres per env step."""
    rot: np.ndarray
    omega: np.ndarray
    """Radians per env step (world-frame rotation vector)."""
    grip: float = -1.0
    """Last gripper command: +1 close, -1 open."""
    grip_steps: int = 100
    """Env steps since the gripper command last changed."""


class GiveUp(Exception):
    """Raised inside the script when a goal predicate has no skill or failed MAX_ATTEMPTS times."""


class LiberoExpert:
    """Scripted expert for the current episode of a `LiberoEnv`: build it after `env.reset`, then call
    `chunk()` for every chunk. It never steps the env and never touches the env's RNG.

        expert = LiberoExpert(env)
        while not done:
            obs, reward, terminated, truncated, info = env.step_chunk(expert.chunk(8))

    `noise`: std of Gaussian noise (normalised units) on the translation dims of the executed actions
    (and a third of it on the rotation dims), drawn from `rng`; the plan accounts for the noisy action.
    """

    def __init__(self, env, noise: float = 0.0, rng: np.random.Generator | None = None):
        self.env = env
        self.sim = env.sim
        if self.sim is None:
            raise RuntimeError("LiberoExpert needs an env that has been reset")
        self.noise = noise
        self.rng = rng if rng is not None else np.random.default_rng()
        q01, q99 = (np.asarray(v, dtype=np.float64) for v in OPENVLA_ACTION_STATS[env.action_stats])
        self._low, self._high = q01, q99
        self._scale, self._offset = 0.5 * (q99 - q01), 0.5 * (q99 + q01)
        self._yaw_rate = (-q01[5] * OSC_ROT_RAD * TRACK_ROT * 0.8, q99[5] * OSC_ROT_RAD * TRACK_ROT * 0.8)
        """Radians per step the hand turns at most, clockwise and anticlockwise (0.8: the P controller
        stops saturating before the end)."""
        self.model = self.sim.sim.model._model
        self.data = self.sim.sim.data._data
        self.robot = self.sim.robots[0]
        self.problem = {"goal": [tuple(p) for p in self.sim.parsed_problem["goal_state"]],
                        "objects": {n: c for c, names in self.sim.parsed_problem["objects"].items() for n in names},
                        "fixtures": {n: c for c, names in self.sim.parsed_problem["fixtures"].items() for n in names}}
        self.plan = [(p, skill_for(p, self.problem)[0]) for p in self.problem["goal"]]
        """(goal predicate, skill or None), in the BDDL's order."""
        self._names = [*self.sim.objects_dict, *self.sim.fixtures_dict]
        self._geoms = {name: self._collision_geoms(self.sim.obj_body_id[name]) for name in self._names}
        self._all_geoms = np.concatenate(list(self._geoms.values()))
        self._owner = np.full(self.model.ngeom, -1)
        for i, name in enumerate(self._names):
            self._owner[self._geoms[name]] = i
        robot_base = self.data.xpos[self.model.body(self.robot.robot_model.root_body).id]
        self._shoulder = robot_base + np.array([0.0, 0.0, SHOULDER_M])
        self._site = self.robot.eef_site_id
        pads = [self.model.geom(g).id for g in self.robot.gripper.important_geoms["left_fingerpad"]
                + self.robot.gripper.important_geoms["right_fingerpad"]]
        self._pads = pads
        rot = self.data.site_xmat[self._site].reshape(3, 3)
        across = self.data.geom_xpos[pads[-1]] - self.data.geom_xpos[pads[0]]
        self._closing_local = rot.T @ (across / np.linalg.norm(across))
        """The fingers' closing direction in the grip site's frame."""
        self.holding: str | None = None
        """The object the hand is closing on or carrying."""
        self._hold_offset: float | None = None
        """Hand height over the held object's body when the grasp was first confirmed."""
        self._pick_height = 0.0
        """Height of the object's body when the fingers began to close."""
        self.status = "running"
        self.attempts: dict[tuple, int] = {}
        self.restarts = 0
        self.phase = ""
        """What the script is doing (for debugging)."""
        self.log: list[str] = []
        """Restarts and give-ups, for debugging."""
        self._syncs = 0
        self.belief = self._read_belief(grip=-1.0, grip_steps=100)
        self._script = self._solve()

    # -- privileged state --------------------------------------------------------------------------------
    def _collision_geoms(self, root: int) -> np.ndarray:
        model = self.model
        body = np.arange(model.nbody)
        inside = np.zeros(model.nbody, dtype=bool)
        for b in body:  # parents come before children in MuJoCo's body order
            inside[b] = b == root or (b > 0 and inside[model.body_parentid[b]])
        geoms = [g for g in range(model.ngeom) if inside[model.geom_bodyid[g]]
                 and (model.geom_contype[g] or model.geom_conaffinity[g])]
        return np.array(geoms, dtype=int)

    def geom_boxes(self, names=None) -> dict[str, np.ndarray]:
        """The collision geoms of objects and fixtures (all, or those of `names`) as boxes, now:
        "low", "high" (G, 3) world axis-aligned bounds; "center" (G, 3); "axes" (G, 3, 2) the box's three
        half-axis vectors projected on the table plane (its footprint, for `_footprint_overlaps`);
        "owner" (G,) index into `self._names`."""
        geoms = self._all_geoms if names is None else np.concatenate([self._geoms[n] for n in names])
        rot = self.data.geom_xmat[geoms].reshape(-1, 3, 3)
        center = self.data.geom_xpos[geoms] + np.einsum("gij,gj->gi", rot, self.model.geom_aabb[geoms, :3])
        half_sizes = self.model.geom_aabb[geoms, 3:]
        half = np.einsum("gij,gj->gi", np.abs(rot), half_sizes)
        axes = np.transpose(rot[:, :2, :] * half_sizes[:, None, :], (0, 2, 1))  # (G, 3 box axes, xy)
        return {"low": center - half, "high": center + half, "center": center, "axes": axes,
                "owner": self._owner[geoms]}

    def aabb(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """World axis-aligned box (low, high) around an object's or fixture's collision geoms, now."""
        boxes = self.geom_boxes((name,))
        return boxes["low"].min(0), boxes["high"].max(0)

    def body_frame_box(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(center world, half sizes in the body frame, body rotation, body pos) of an object's geoms."""
        geoms = self._geoms[name]
        body = self.sim.obj_body_id[name]
        body_rot = self.data.xmat[body].reshape(3, 3)
        body_pos = self.data.xpos[body]
        rot = np.einsum("ji,gjk->gik", body_rot, self.data.geom_xmat[geoms].reshape(-1, 3, 3))  # geom in body
        center = (self.data.geom_xpos[geoms] - body_pos) @ body_rot + np.einsum(
            "gij,gj->gi", rot, self.model.geom_aabb[geoms, :3])
        half = np.einsum("gij,gj->gi", np.abs(rot), self.model.geom_aabb[geoms, 3:])
        low, high = (center - half).min(0), (center + half).max(0)
        return body_pos + body_rot @ ((low + high) / 2), (high - low) / 2, body_rot, body_pos

    def site_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        site = self.model.site(name).id
        return self.data.site_xpos[site].copy(), self.data.site_xmat[site].reshape(3, 3).copy()

    def object_pos(self, name: str) -> np.ndarray:
        return self.data.xpos[self.sim.obj_body_id[name]].copy()

    def holds(self, predicate: tuple) -> bool:
        return bool(self.sim._eval_predicate(list(predicate)))

    def grasped(self, name: str) -> bool:
        """Both fingers touch the object (robosuite's `_check_grasp` asks for the pads; a bottle's neck is
        often held by the fingers just above them)."""
        fingers = self.robot.gripper.important_geoms
        obj = self.sim.get_object(name)
        return bool(self.sim.check_contact(fingers["left_finger"], obj)
                    and self.sim.check_contact(fingers["right_finger"], obj))

    def _read_belief(self, grip: float, grip_steps: int) -> _Belief:
        import mujoco

        velocity = np.zeros(6)  # (angular, linear), world frame
        mujoco.mj_objectVelocity(self.model, self.data, mujoco.mjtObj.mjOBJ_SITE, self._site, velocity, 0)
        dt = self.sim.control_timestep
        return _Belief(pos=self.data.site_xpos[self._site].copy(), vel=velocity[3:] * dt,
                       rot=self.data.site_xmat[self._site].reshape(3, 3).copy(), omega=velocity[:3] * dt,
                       grip=grip, grip_steps=grip_steps)

    def _lost_grasp(self, name: str) -> str:
        """Why the held object is not held (a miss or a drop), or "". Once the fingers have closed, both
        must touch it; afterwards one touching finger is enough as long as the object keeps its height
        relative to the hand (a bowl held by the rim may pivot off one finger for a moment)."""
        drop = self.data.site_xpos[self._site][2] - self.object_pos(name)[2]
        fingers = self.robot.gripper.important_geoms
        obj = self.sim.get_object(name)
        touching = (self.sim.check_contact(fingers["left_finger"], obj)
                    or self.sim.check_contact(fingers["right_finger"], obj))
        if self._hold_offset is None:
            lifted = self.object_pos(name)[2] > self._pick_height + 0.01
            if not (self.grasped(name) or (touching and lifted)):
                return "missed the grasp"
            self._hold_offset = drop
            return ""
        if not touching or abs(drop - self._hold_offset) > SLIP_M:
            return "dropped the object"
        return ""

    # -- the chunk interface ---------------------------------------------------------------------------
    def chunk(self, chunk_len: int = 8) -> np.ndarray:
        """The next `chunk_len` normalised actions (chunk_len, 7), planned from the state now."""
        b = self.belief
        self.belief = self._read_belief(b.grip, b.grip_steps)
        self._syncs += 1
        if self.holding is not None and self.belief.grip > 0 and self.belief.grip_steps >= GRIPPER_STEPS:
            lost = self._lost_grasp(self.holding)
            if lost:  # missed or dropped: plan again from what is true now
                self.log.append(f"step {self.env.env_steps}: {lost} ({self.status})")
                self.holding, self._hold_offset = None, None
                self.restarts += 1
                self._script = self._solve()
        out = np.empty((chunk_len, 7))
        for k in range(chunk_len):
            out[k] = next(self._script)
        return out

    def _solve(self):
        """The whole task: skills for the goal predicates, in order, until they all hold."""
        try:
            while True:
                todo = [(p, skill) for p, skill in self.plan if not self.holds(p)]
                if not todo:
                    self.status = "done"
                    yield from self._idle()
                    return
                predicate, skill = todo[0]
                if skill is None:
                    raise GiveUp(f"unsupported {predicate}")
                self.attempts[predicate] = self.attempts.get(predicate, 0) + 1
                if self.attempts[predicate] > MAX_ATTEMPTS:
                    raise GiveUp(f"{predicate} failed {MAX_ATTEMPTS} times")
                self.status = f"{skill} {' '.join(predicate[1:])}"
                yield from getattr(self, "_" + skill)(*predicate[1:])
                yield from self._until_synced()
        except GiveUp as why:
            self.status = f"gave up: {why}"
            yield from self._idle()

    # -- motion primitives (generators of one normalised action per env step) ----------------------------
    def _act(self, goal: np.ndarray, yaw: float | None, grip: float) -> np.ndarray:
        """One action driving the predicted hand toward `goal` (grip site, world) with the closing axis
        at `yaw` (None: hold the current yaw), gripper `grip`; advances the belief by the model."""
        b = self.belief
        u = np.zeros(6)
        u[:3] = GAIN_POS * (goal - b.pos) / TRACK_POS / OSC_POS_M
        u[3:] = GAIN_ROT * _rotvec(self._target_rot(yaw) @ b.rot.T) / TRACK_ROT / OSC_ROT_RAD
        action = np.empty(7)
        action[:6] = np.clip((np.clip(u, self._low, self._high) - self._offset) / self._scale, -1.0, 1.0)
        if self.noise > 0:
            action[:3] += self.rng.normal(0.0, self.noise, 3)
            action[3:6] += self.rng.normal(0.0, self.noise / 3, 3)
            action[:6] = np.clip(action[:6], -1.0, 1.0)
        action[6] = 1.0 if grip > 0 else -1.0
        executed = action[:6] * self._scale + self._offset  # what LiberoEnv.to_libero_action sends
        b.vel = (1 - LAG) * b.vel + LAG * TRACK_POS * OSC_POS_M * executed[:3]
        b.pos = b.pos + b.vel
        b.omega = (1 - LAG) * b.omega + LAG * TRACK_ROT * OSC_ROT_RAD * executed[3:]
        b.rot = _rotmat(b.omega) @ b.rot
        if (grip > 0) != (b.grip > 0):
            b.grip, b.grip_steps = grip, 0
        b.grip_steps += 1
        return action

    def _yaw(self, rot: np.ndarray | None = None) -> float:
        """World yaw of the fingers' closing axis."""
        axis = (self.belief.rot if rot is None else rot) @ self._closing_local
        return math.atan2(axis[1], axis[0])

    def _target_rot(self, yaw: float | None) -> np.ndarray:
        """Hand pointing straight down with the closing axis at `yaw` (nearest half turn)."""
        now = self._yaw()
        yaw = now if yaw is None else now + _wrap(yaw - now)
        closing = np.array([math.cos(yaw), math.sin(yaw), 0.0])
        down = np.array([0.0, 0.0, -1.0])
        local_down = np.array([0.0, 0.0, 1.0])  # the grip site's z axis points out of the hand
        world = np.stack([closing, np.cross(down, closing), down], axis=1)
        local = np.stack([self._closing_local, np.cross(local_down, self._closing_local), local_down], axis=1)
        return world @ local.T

    def _move(self, goal, yaw: float | None = None, grip: float = -1.0, tol: float = 0.005,
              max_steps: int = 150, yaw_tol: float | None = None):
        """Go to `goal` (a point, or a callable giving one, re-read every step), turning toward `yaw` on the
        way; with `yaw_tol`, also wait until the yaw is that close. Also done once the true position has
        stalled near the goal (an arm near the edge of its reach keeps a few millimetres of error)."""
        best, best_step, syncs = np.inf, 0, -1
        for step in range(max_steps):
            target = goal() if callable(goal) else goal
            turned = yaw is None or yaw_tol is None or abs(_wrap(yaw - self._yaw())) < yaw_tol
            error = float(np.linalg.norm(target - self.belief.pos))
            if error < tol and turned:
                return
            if self._syncs != syncs:  # the belief was just re-read: this error is the true one
                syncs = self._syncs
                if error < best - 0.001:
                    best, best_step = error, step
                elif step - best_step >= STALL_STEPS and error < STALL_TOL_M and turned:
                    return
            yield self._act(target, yaw, grip)

    def _hold(self, grip: float, steps: int, yaw: float | None = None, goal=None):
        """Stay at `goal` (default: where the hand is) for `steps` steps while the gripper opens (-1) or
        closes (+1)."""
        here = self.belief.pos.copy()
        for _ in range(steps):
            yield self._act(here if goal is None else goal(), yaw, grip)

    def _until_synced(self):
        """Hold still until the next chunk has re-read the true state (so predicates are fresh)."""
        syncs = self._syncs
        here = self.belief.pos.copy()
        while self._syncs == syncs:
            yield self._act(here, None, self.belief.grip)

    def _idle(self):
        while True:
            yield self._act(self.belief.pos.copy(), None, -1.0)

    def _waypoints(self, start: np.ndarray, end: np.ndarray, exclude: tuple = (), radius: float = 0.0,
                   hang: float = 0.0) -> list[np.ndarray]:
        """Grip-site waypoints from above `start` to above `end` (xy), every WAYPOINT_M: high enough that the
        fingers (and a held object hanging `hang` below the grip site, `radius` wide) pass CLEARANCE_M over
        every collision geom near the way (looking one waypoint ahead and behind), low enough for the arm to
        reach, and never below the lower of the two ends."""
        boxes = self.geom_boxes()
        keep = ~np.isin(boxes["owner"], [self._names.index(n) for n in exclude if n in self._names])
        center, axes, top = boxes["center"][keep, :2], boxes["axes"][keep], boxes["high"][keep, 2]
        margin = max(radius, HAND_HALF_LENGTH_M) + 0.01  # the hand may be turned any way on the way
        count = max(2, int(np.ceil(np.linalg.norm(end[:2] - start[:2]) / WAYPOINT_M)) + 1)
        points = np.linspace(start[:2], end[:2], count)
        needed = np.full(count, -np.inf)
        for i, point in enumerate(points):
            near = _footprint_overlaps(point, np.array([1.0, 0.0]), margin, margin, center, axes)
            if near.any():
                needed[i] = top[near].max() + CLEARANCE_M + max(hang, FINGER_REACH_M)
        floor = min(start[2], end[2])
        heights = [max(needed[max(0, i - 1):i + 2].max(), floor) for i in range(count)]
        return [np.r_[point, min(height, self._reach_ceiling(point))] for point, height in zip(points, heights)]

    def _transit(self, goal, yaw: float | None, grip: float, exclude: tuple = (), radius: float = 0.0,
                 hang: float = 0.0, tol: float = 0.005, yaw_tol: float | None = YAW_TOL, final: str = "descend"):
        """Rise, cross over everything on the way (`_waypoints`), then go straight down to `goal` (a point
        or a callable giving one)."""
        target = goal() if callable(goal) else goal
        waypoints = self._waypoints(self.belief.pos, target, exclude, radius, hang)
        if self.belief.pos[2] < waypoints[0][2] - 0.02:
            self.phase = "rise"
            yield from self._move(lambda: np.r_[self.belief.pos[:2], waypoints[0][2]], yaw, grip, tol=0.02)
        self.phase = "cross"
        for waypoint in waypoints[1:-1]:
            yield from self._move(waypoint, yaw, grip, tol=0.025)
        height = waypoints[-1][2]
        yield from self._move(lambda: np.r_[(goal() if callable(goal) else goal)[:2], height], yaw, grip, tol=0.012)
        self.phase = final
        yield from self._move(goal, yaw, grip, tol=tol, yaw_tol=yaw_tol)

    # -- grasping -------------------------------------------------------------------------------------
    def _grasp_plan(self, name: str) -> tuple[np.ndarray, float]:
        """(grip-site point relative to the object's body position, closing-axis yaw) of the best top-down
        grasp: candidates around the object, scored by how far the hand must turn and reach, rejecting those
        where the hand or the open fingers would hit another geom (see `_hand_collisions`)."""
        center, half, body_rot, body_pos = self.body_frame_box(name)
        low, high = self.aabb(name)
        # The body frame of a LIBERO object need not be upright: its horizontal axes are the two that
        # point least up.
        horizontal = np.argsort(np.abs(body_rot[2]))[:2]
        half, body_rot = half[horizontal], body_rot[:, horizontal]
        category = _category(name, self.problem)
        now = self._yaw()
        turns = np.radians(np.arange(-90, 91, 15))
        candidates = []  # (grip-site point, closing-axis yaw, distance off the object's centre)
        if any(style in category for style in RIM_STYLE):
            # One finger inside, one outside the wall, closing radially, RIM_DEPTH_M below the rim: the
            # candidates are the middles of the wall's collision pieces (a pinch across the seam between
            # two pieces slips), on each piece's mid-plane at the grasp height.
            height = high[2] - RIM_DEPTH_M
            for geom in self._geoms[name]:
                rot = self.data.geom_xmat[geom].reshape(3, 3)
                piece = self.data.geom_xpos[geom] + rot @ self.model.geom_aabb[geom, :3]
                long = rot[:, int(np.argmax(self.model.geom_aabb[geom, 3:]))]  # the piece's long axis
                radial = piece[:2] - center[:2]
                if abs(long[2]) < 0.5 or np.linalg.norm(radial) < 0.5 * min(half):
                    continue  # not an upright piece of the outer wall
                point = piece + (height - piece[2]) / long[2] * long
                if abs(point[2] - piece[2]) > self.model.geom_aabb[geom, 3:].max():
                    continue  # the piece does not reach the grasp height
                candidates.append((point, math.atan2(radial[1], radial[0]), 0.0))
            if not candidates:  # no wall pieces: a circle just inside the outer radius
                for turn in turns:
                    for side in (1.0, -1.0):
                        direction = side * np.array([math.cos(now + turn), math.sin(now + turn), 0.0])
                        point = center + (min(half) - RIM_INSET_M) * direction
                        point[2] = height
                        candidates.append((point, now + turn, 0.0))
        else:
            point = center.copy()
            point[2] = max(low[2] + FINGER_REACH_M + 0.003, high[2] - PALM_CLEARANCE_M)
            if 2 * max(half[0], half[1]) <= MAX_OPENING_M:  # fits either way
                candidates = [(point, now + turn, 0.0) for turn in turns]
            else:  # close across the short side, anywhere along the long one (away from neighbours)
                short, long = (0, 1) if half[0] <= half[1] else (1, 0)
                across = math.atan2(body_rot[1, short], body_rot[0, short])
                room = max(0.0, half[long] - GRASP_EDGE_M)
                for shift in np.clip(np.arange(-0.03, 0.031, 0.01), -room, room):
                    shifted = point + shift * body_rot[:, long]
                    candidates += [(shifted, across + turn, abs(shift)) for turn in np.radians([0, -10, 10])]
        best, best_cost = None, np.inf
        for point, yaw, off_center in candidates:
            # Cost in env steps: turning is slow (the suite's action statistics cap the yaw rate at
            # ~0.01-0.04 rad per step), but free while the hand is on its way anyway.
            turn = _wrap(yaw - now)
            turn_steps = abs(turn) / self._yaw_rate[int(turn > 0)]
            travel_steps = float(np.abs(point - self.belief.pos).sum()) / TYPICAL_SPEED_M
            overreach = self._overreach(point)
            cost = (max(0.0, turn_steps - travel_steps) + 0.1 * turn_steps + 3000.0 * overreach + 100.0 * off_center
                    + 100.0 * self._hand_collisions(point, yaw, name))
            if cost < best_cost:
                best, best_cost = (point, yaw), cost
        point, yaw = best
        return point - body_pos, yaw

    def _wrist(self, point: np.ndarray) -> np.ndarray:
        """Where the wrist (joint 6) is when the pointing-down grip site is at `point`."""
        back = self._shoulder[:2] - point[:2]
        back = back / max(float(np.linalg.norm(back)), 1e-9)
        return point + np.r_[WRIST_BACK_M * back, WRIST_ABOVE_SITE_M]

    def _overreach(self, point: np.ndarray) -> float:
        """How far (m) a grip-site point is beyond the arm's reach (0 inside it)."""
        return max(0.0, float(np.linalg.norm(self._wrist(point) - self._shoulder)) - REACH_M)

    def _reach_ceiling(self, xy: np.ndarray) -> float:
        """Highest grip-site height the arm reaches over `xy`."""
        wrist = self._wrist(np.r_[xy, 0.0])
        horizontal = float(np.linalg.norm(wrist[:2] - self._shoulder[:2]))
        return self._shoulder[2] + math.sqrt(max(REACH_M**2 - horizontal**2, 0.0)) - WRIST_ABOVE_SITE_M

    def _hand_collisions(self, point: np.ndarray, yaw: float, target: str) -> int:
        """How many collision geoms (other than the target's) the open hand, descending straight down to a
        grasp at `point` with the closing axis at `yaw`, then closing, would hit: the palm (everything above
        the grip site's palm height) and the fingers (everything between them, too)."""
        boxes = self.geom_boxes()
        other = boxes["owner"] != self._names.index(target)
        axis = np.array([math.cos(yaw), math.sin(yaw)])
        center, axes, high = boxes["center"][:, :2], boxes["axes"], boxes["high"][:, 2]
        hits = other & (high > point[2] + PALM_CLEARANCE_M) & _footprint_overlaps(
            point[:2], axis, HAND_HALF_LENGTH_M + 0.005, HAND_HALF_WIDTH_M + 0.005, center, axes)
        # the fingers, and all they sweep through while closing
        hits |= other & (high > point[2] - FINGER_REACH_M + 0.005) & _footprint_overlaps(
            point[:2], axis, FINGER_OFFSET_M + FINGER_HALF_M + 0.005, FINGER_HALF_M + 0.005, center, axes)
        return int(hits.sum())

    def _pick(self, name: str):
        """Over the best grasp (`_grasp_plan`), straight down, close."""
        offset, yaw = self._grasp_plan(name)
        grasp = lambda: self.object_pos(name) + offset  # noqa: E731 - re-read: the object may be nudged
        above = lambda: grasp() + np.array([0.0, 0.0, 0.06])  # noqa: E731
        yield from self._transit(above, yaw, -1.0)
        self.phase = "reach grasp"
        yield from self._move(grasp, yaw, -1.0, tol=0.004, max_steps=60, yaw_tol=YAW_TOL)
        self.holding, self._pick_height = name, self.object_pos(name)[2]
        self.phase = "close"
        yield from self._hold(+1.0, GRIPPER_STEPS, yaw, goal=grasp)

    # -- skills -------------------------------------------------------------------------------------------
    def _place_xy(self, target: str) -> np.ndarray:
        """Where the placed object's body should end up (xy): on an object, over its body origin (LIBERO's
        On wants the two within 3 cm); in or on a region, over the region's centre."""
        if target in self.sim.objects_dict or target in self.sim.fixtures_dict:
            return self.object_pos(target)[:2]
        return self.site_pose(target)[0][:2]

    def _release_height(self, name: str, goal_xy: np.ndarray) -> float:
        """Grip-site height at which to open the hand once the held object's body is over `goal_xy`: the
        object's bottom DROP_M above whatever lies under it there (a plate, a basket's floor), unless the
        palm or the fingers would first touch something else (a basket's rim)."""
        ee = self.data.site_xpos[self._site]
        low, high = self.aabb(name)
        shift = goal_xy - self.object_pos(name)[:2]  # where object and hand will be, relative to now
        boxes = self.geom_boxes()
        other = boxes["owner"] != self._names.index(name)
        center, axes, top = boxes["center"][:, :2], boxes["axes"], boxes["high"][:, 2]

        def highest(where: np.ndarray) -> float:
            return float(top[other & where].max()) if np.any(other & where) else -np.inf

        x_axis = np.array([1.0, 0.0])
        under = _footprint_overlaps((low[:2] + high[:2]) / 2 + shift, x_axis, *((high[:2] - low[:2]) / 2),
                                    center, axes)
        closing = self.data.site_xmat[self._site].reshape(3, 3) @ self._closing_local
        closing = closing[:2] / max(np.linalg.norm(closing[:2]), 1e-9)
        palm = _footprint_overlaps(ee[:2] + shift, closing, HAND_HALF_LENGTH_M, HAND_HALF_WIDTH_M, center, axes)
        fingers = np.zeros_like(palm)
        for pad in self._pads:
            fingers |= _footprint_overlaps(self.data.geom_xpos[pad][:2] + shift, closing, FINGER_HALF_M,
                                           FINGER_HALF_M, center, axes)
        return max(highest(under) + DROP_M + (ee[2] - low[2]), highest(palm) + 0.005 - PALM_CLEARANCE_M,
                   highest(fingers) + FINGER_REACH_M + 0.005)

    def _pick_place(self, name: str, target: str):
        """Pick `name`, carry it (its body, not the hand, over the goal) over everything on the way, lower,
        let go, retreat."""
        yield from self._pick(name)
        goal_xy = self._place_xy(target)

        def hand_goal() -> np.ndarray:
            """Hand xy that puts the object's body over the goal (the grasp offset as it is now)."""
            return goal_xy + self.data.site_xpos[self._site][:2] - self.object_pos(name)[:2]

        low, high = self.aabb(name)
        hang = self.data.site_xpos[self._site][2] - low[2]
        radius = float(np.max(high[:2] - low[:2]) / 2)
        release = lambda: np.r_[hand_goal(), self._release_height(name, goal_xy)]  # noqa: E731
        yield from self._transit(release, None, +1.0, exclude=(name,), radius=radius, hang=hang, tol=0.006,
                                 yaw_tol=None, final="lower")
        self.phase = "release"
        yield from self._hold(-1.0, OPEN_STEPS)
        self.holding, self._hold_offset = None, None
        self.phase = "retreat"
        yield from self._move(self.belief.pos + np.array([0.0, 0.0, 0.08]), None, -1.0, tol=0.02)


# ---------------------------------------------------------------------------------------------------------
# Evaluation: success per task from the fixed initial states
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    """Scripted-expert success per task on LIBERO's fixed initial states (no camera is rendered)."""

    suite: str = "libero_spatial"
    """libero_spatial, libero_object, libero_goal or libero_10."""
    episodes_per_task: int = 10
    """Episodes per task, from fixed initial states first_state, first_state + 1, ..."""
    tasks: tuple[int, ...] = ()
    """Task indices (default: every task of the suite)."""
    first_state: int = 0
    """Index of the first fixed initial state (0-49)."""
    chunk_len: int = 8
    """Actions planned open-loop per chunk, as the policy acts (1 = closed loop)."""
    noise: float = 0.0
    """Action noise of the expert (normalised units, translation dims)."""
    seed: int = 0
    """Seed of the noise."""
    verbose: bool = False
    """Print one line per episode."""


def run_episode(env, task_id: int, state: int, chunk_len: int = 8, noise: float = 0.0,
                rng: np.random.Generator | None = None) -> dict:
    """One expert episode from a fixed initial state (the env must have init_states="fixed"), stepping
    without rendering. Returns {"success", "env_steps", "status", "restarts"}."""
    env.reset(task_id=task_id, seed=state)
    expert = LiberoExpert(env, noise=noise, rng=rng)
    done, success = False, False
    while not done:
        for action in expert.chunk(chunk_len):
            _, terminated, truncated, info = env.step_unobserved(action)
            done, success = terminated or truncated, info["success"]
            if done:
                break
    return {"success": bool(success), "env_steps": env.env_steps, "status": expert.status,
            "restarts": expert.restarts}


def evaluate(args: Args) -> dict:
    from envs.libero import LiberoEnv

    if args.suite not in SUITES:
        raise SystemExit(f"unknown suite {args.suite!r}")
    names = _suite_task_names(args.suite)
    tasks = list(args.tasks) or list(range(len(names)))
    env = LiberoEnv(args.suite, image_size=16, seed=args.seed, init_states="fixed")
    rng = np.random.default_rng(args.seed)
    rows = []
    start = time.time()
    try:
        for task in tasks:
            reason = unsupported_reason(args.suite, task)
            row = {"task": task, "instruction": " ".join(re.sub(r"^[A-Z_0-9]+SCENE\d+_", "", names[task]).split("_")),
                   "supported": not reason, "reason": reason, "episodes": 0, "successes": 0, "steps": []}
            if not reason:
                for k in range(args.episodes_per_task):
                    result = run_episode(env, task, (args.first_state + k) % 50, args.chunk_len, args.noise, rng)
                    row["episodes"] += 1
                    row["successes"] += result["success"]
                    row["steps"].append(result["env_steps"])
                    if args.verbose:
                        print(f"task {task} state {(args.first_state + k) % 50}: {result}", flush=True)
            rows.append(row)
    finally:
        env.close()
    return {"suite": args.suite, "episodes_per_task": args.episodes_per_task, "chunk_len": args.chunk_len,
            "noise": args.noise, "first_state": args.first_state, "seconds": round(time.time() - start, 1),
            "tasks": rows}


def print_table(result: dict) -> None:
    print(f"scripted expert on {result['suite']}: {result['episodes_per_task']} episodes per task from fixed "
          f"states {result['first_state']}.., chunk {result['chunk_len']}, noise {result['noise']}, "
          f"{result['seconds']} s")
    print("| task | instruction | success | mean steps |")
    print("|---|---|---|---|")
    for row in result["tasks"]:
        if not row["supported"]:
            print(f"| {row['task']} | {row['instruction']} | unsupported: {row['reason']} | - |")
            continue
        rate = row["successes"] / max(row["episodes"], 1)
        print(f"| {row['task']} | {row['instruction']} | {rate:.0%} ({row['successes']}/{row['episodes']}) | "
              f"{np.mean(row['steps']):.0f} |")
    summary = {"suite": result["suite"], "episodes_per_task": result["episodes_per_task"],
               "success": {str(r["task"]): (r["successes"] / r["episodes"] if r["episodes"] else None)
                           for r in result["tasks"]},
               "mean_steps": {str(r["task"]): (float(np.mean(r["steps"])) if r["steps"] else None)
                              for r in result["tasks"]},
               "seconds": result["seconds"]}
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> int:
    import tyro

    print_table(evaluate(tyro.cli(Args, args=argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
