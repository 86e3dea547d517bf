"""Scripted LIBERO experts (envs/libero_experts.py): BDDL goal parsing (checked against LIBERO's own parser
on every task of the four suites), which tasks have skills, the footprint geometry, and the expert solving a
libero_spatial task from a fixed initial state, also through demos.py's collection episode. Needs the LIBERO
stack for everything but the pure parts (skipped loudly without it, as tests/test_libero.py). ~30 s on 2 cores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from envs.libero_experts import _footprint_overlaps, parse_bddl, skill_for

from libero_stack import MISSING, SKIP_REASON, needs_libero  # tests/libero_stack.py

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
BDDL = """
(define (problem LIBERO_Kitchen_Tabletop_Manipulation)
  (:domain robosuite)
  (:language Put the black bowl in the bottom drawer of the cabinet and close it)  ; a comment
  (:fixtures
    main_table - table
    white_cabinet_1 - white_cabinet
  )
  (:objects
    akita_black_bowl_1 akita_black_bowl_2 - akita_black_bowl
    plate_1 - plate
  )
  (:goal
    (And (Close white_cabinet_1_bottom_region) (In akita_black_bowl_1 white_cabinet_1_bottom_region))
  )
)
"""


def test_parse_bddl_reads_goal_objects_fixtures_language():
    problem = parse_bddl(BDDL)
    assert problem["goal"] == [("close", "white_cabinet_1_bottom_region"),
                               ("in", "akita_black_bowl_1", "white_cabinet_1_bottom_region")]
    assert problem["objects"] == {"akita_black_bowl_1": "akita_black_bowl", "akita_black_bowl_2": "akita_black_bowl",
                                  "plate_1": "plate"}
    assert problem["fixtures"] == {"main_table": "table", "white_cabinet_1": "white_cabinet"}
    assert problem["language"].startswith("Put the black bowl")
    single = parse_bddl(BDDL.split("(:goal")[0] + "(:goal (On plate_1 akita_black_bowl_2)))")  # no conjunction
    assert single["goal"] == [("on", "plate_1", "akita_black_bowl_2")]


def test_skills_for_predicates():
    problem = parse_bddl(BDDL)
    assert skill_for(("on", "akita_black_bowl_1", "plate_1"), problem) == ("pick_place", "")
    assert skill_for(("in", "akita_black_bowl_1", "white_cabinet_1_top_side"), problem)[0] == "pick_place"
    for drawer in (("in", "akita_black_bowl_1", "white_cabinet_1_bottom_region"),
                   ("close", "white_cabinet_1_bottom_region")):
        skill, reason = skill_for(drawer, problem)
        assert skill is None and "drawer" in reason
    skill, reason = skill_for(("on", "plate_1", "main_table_stove_front_region"), problem)
    assert skill is None and "plate" in reason
    assert skill_for(("open", "microwave_1"), problem)[0] is None


def test_footprint_overlap_is_exact_for_rotated_boxes():
    # a 10 x 2 cm box turned 45 degrees, seen from above; its axis-aligned bounds would reach (0.04, 0.04)
    turn = math.radians(45)
    axes = np.array([[[0.05 * math.cos(turn), 0.05 * math.sin(turn)],
                      [-0.01 * math.sin(turn), 0.01 * math.cos(turn)], [0.0, 0.0]]])
    center = np.zeros((1, 2))
    x_axis = np.array([1.0, 0.0])
    assert _footprint_overlaps(np.array([0.03, 0.03]), x_axis, 0.005, 0.005, center, axes)[0]  # on the long axis
    assert not _footprint_overlaps(np.array([0.035, -0.035]), x_axis, 0.005, 0.005, center, axes)[0]  # corner
    assert not _footprint_overlaps(np.array([0.08, 0.0]), x_axis, 0.01, 0.01, center, axes)[0]
    # a long thin rectangle crossing the box
    assert _footprint_overlaps(np.array([0.0, 0.2]), np.array([0.0, 1.0]), 0.25, 0.002, center, axes)[0]


@needs_libero
@pytest.mark.parametrize("suite", SUITES)
def test_goal_parsing_matches_liberos_parser(suite):
    from envs.libero import ensure_libero_config

    ensure_libero_config()  # before LIBERO's first import, which otherwise prompts for its config
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    from envs.libero import _suite_task_names, libero_root
    from envs.libero_experts import task_problem

    for task_id, name in enumerate(_suite_task_names(suite)):
        ours = task_problem(suite, task_id)
        theirs = robosuite_parse_problem(f"{libero_root()}/bddl_files/{suite}/{name}.bddl")
        assert ours["goal"] == [tuple(p) for p in theirs["goal_state"]], name
        assert ours["objects"] == {n: c for c, names in theirs["objects"].items() for n in names}, name


@needs_libero
def test_supported_tasks():
    from envs.libero_experts import DRAWERS, unsupported_reason

    for suite in ("libero_spatial", "libero_object"):
        assert all(unsupported_reason(suite, t) == "" for t in range(10)), suite
    assert "plate" in unsupported_reason("libero_goal", 5)  # push the plate
    assert "moka pot" in unsupported_reason("libero_10", 8) and "stove" in unsupported_reason("libero_10", 8)
    assert unsupported_reason("libero_10", 3) == DRAWERS  # one reason for its two drawer predicates
    assert unsupported_reason("libero_10", 0) == ""  # two objects into the basket


@pytest.fixture(scope="module")
def spatial_env():
    if MISSING:
        pytest.skip(SKIP_REASON)
    from envs.libero import LiberoEnv

    env = LiberoEnv("libero_spatial", image_size=32, seed=0, init_states="fixed")
    yield env
    env.close()


@needs_libero
def test_expert_solves_a_spatial_task_from_a_fixed_state(spatial_env):
    from envs.libero_experts import LiberoExpert, run_episode

    result = run_episode(spatial_env, task_id=0, state=0, chunk_len=8)
    assert result["success"] and result["env_steps"] < 200, result
    # Deterministic: the same state gives the same first chunk; actions are in the env's action space.
    spatial_env.reset(task_id=0, seed=0)
    first = LiberoExpert(spatial_env).chunk(8)
    spatial_env.reset(task_id=0, seed=0)
    again = LiberoExpert(spatial_env).chunk(8)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (8, 7) and np.all(np.abs(first) <= 1.0) and set(np.unique(first[:, 6])) <= {-1.0, 1.0}


@needs_libero
def test_collection_episode_records_the_expert(spatial_env):
    """demos.py's collection episode drives the LIBERO expert and records MuJoCo states as LIBERO does."""
    from demos import run_expert_episode

    episode = run_expert_episode(spatial_env, task_id=0, env_seed=1, noise_seed=0, chunk_len=8, noise=0.05)
    steps = len(episode["actions"])
    assert episode["success"] and steps < 220
    assert episode["images"].shape == (steps, 32, 32, 3) and episode["proprio"].shape == (steps, 8)
    sim = spatial_env.sim.sim
    assert episode["states"].shape == (steps, 1 + sim.model.nq + sim.model.nv)
