"""The sandbox task: a 2-D point agent goes around a bar to the goal its instruction names.

Geometry (unit square, y up; the rendered image has y=1 at its top row):

    +-----------------------------+
    |    (red)          (blue)    |   two goal discs, in two of five slots along the top
    |                             |
    |       ###############       |   the obstacle: a horizontal bar in the middle
    |                             |
    |              o              |   the agent starts at the bottom centre (small jitter)
    +-----------------------------+

Both image and language matter: the goals change slots every episode and the instruction picks
one colour. The slots are few on purpose: the sandbox's tiny VLM learns to see from a few hundred
demonstrations, which is enough to tell five slots apart but not to place a goal anywhere
precisely (with goals anywhere in the band, a teacher trained on 500 episodes succeeded in about
55% of rollouts, mostly missing the goal).

Every start sees the bar between itself and the goals, so a good demonstrator goes around it on
the left or on the right: two equally good routes for the same observation (bimodal data). The
straight line to the goal, the average of the two routes, always hits the bar.

Reward is sparse and honest: 1.0 on the step that reaches the instructed goal, 0 otherwise, so an
episode's return is its success. Touching the bar ends the episode as a failure.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ENV_ID = "reflow_exp/Sandbox-v0"

COLOURS = ("red", "blue")
INSTRUCTIONS = tuple(f"go to the {colour} goal" for colour in COLOURS)

# Geometry, in unit-square coordinates.
OBSTACLE = (0.25, 0.40, 0.75, 0.50)  # (x0, y0, x1, y1) of the bar
AGENT_RADIUS = 0.02  # the agent collides when its disc touches the bar
GOAL_RADIUS = 0.08  # success: the agent's centre is inside the instructed goal's disc (5 px at 64 px)
START = (0.5, 0.1)
START_JITTER = 0.03
GOAL_SLOTS_X = (0.15, 0.325, 0.5, 0.675, 0.85)  # 0.175 apart: discs of neighbouring slots never touch
GOAL_Y = 0.8
MAX_STEP = 0.05  # longest displacement per step; longer actions are scaled down to it
MAX_EPISODE_STEPS = 60  # the expert needs at most ~30

IMAGE_SIZE = 64
RENDER_SIZE = 256

# RGB colours of the rendering.
_BACKGROUND = (235, 235, 235)
_OBSTACLE_RGB = (70, 70, 70)
GOAL_RGB = {"red": (220, 40, 40), "blue": (40, 80, 220)}
_AGENT_RGB = (30, 150, 60)
_AGENT_DRAW_RADIUS = 0.03  # a little larger than AGENT_RADIUS so the agent stays visible at 64 px

# Episode seeds: dataset episode i of a dataset made with `seed` runs the env with
# TRAIN_SEED_OFFSET + SEED_STRIDE * seed + i; evaluation episode j of an evaluation made with `seed`
# on split s runs it with EVAL_SEED_OFFSETS[s] + SEED_STRIDE * seed + j. The three ranges never
# meet (for seeds below 1000 and fewer than SEED_STRIDE episodes), so a policy is never evaluated
# on a training episode's layout, and the two evaluation splits never share an episode:
#   "dev"    — for choosing anything (task, defaults, ablations); what every number before the
#              split was measured on (EVAL_SEED_OFFSET is its offset);
#   "report" — for publishing only: no default, gin file or README choice is tuned on it.
# A fourth range, VISITED_SEED_OFFSET, holds the episodes the teacher is rolled out on to record the
# states it visits (`reflow.visited_episodes`, reflow_exp/visited.py): frames the student trains on,
# so they meet neither a training nor an evaluation seed. It is not an evaluation split.
TRAIN_SEED_OFFSET = 0
EVAL_SEED_OFFSET = 1_000_000_000
REPORT_SEED_OFFSET = 2_000_000_000
EVAL_SEED_OFFSETS = {"dev": EVAL_SEED_OFFSET, "report": REPORT_SEED_OFFSET}
VISITED_SEED_OFFSET = 3_000_000_000
SEED_STRIDE = 1_000_000


def train_episode_seed(seed: int, episode: int) -> int:
    """Env seed of dataset episode `episode` in a dataset recorded with `seed`."""
    return _episode_seed(TRAIN_SEED_OFFSET, seed, episode)


def eval_episode_seed(seed: int, episode: int, split: str = "dev") -> int:
    """Env seed of evaluation episode `episode` in an evaluation run with `seed` on `split`."""
    if split not in EVAL_SEED_OFFSETS:
        raise ValueError(
            f"unknown evaluation split {split!r}; choose 'dev' (for choosing) or 'report' (for publishing)"
        )
    return _episode_seed(EVAL_SEED_OFFSETS[split], seed, episode)


def _episode_seed(offset: int, seed: int, episode: int) -> int:
    if not 0 <= seed < 1000:
        raise ValueError(f"seed must be in [0, 1000) so train and eval seeds stay apart, got {seed}")
    if not 0 <= episode < SEED_STRIDE:
        raise ValueError(f"episode index must be in [0, {SEED_STRIDE}), got {episode}")
    return offset + SEED_STRIDE * seed + episode


# Layouts: which slot holds the red goal and which the blue one (20 ordered pairs; with the two
# instructions, 40 layouts). HELDOUT_LAYOUTS is a layout split: with it, the recorder skips these
# pairs (`record_dataset(holdout_layouts=True)`) and evaluation can keep to them
# (`Evaluator.layouts = "heldout"`). Each slot holds each colour once in it, so training still
# shows every colour in every slot and every slot as a target: only the combinations are new.
HELDOUT_LAYOUTS = frozenset({(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)})  # (red slot, blue slot)
LAYOUT_SETS = ("all", "train", "heldout")


def layout_of(env_seed: int) -> tuple[int, int]:
    """(red slot, blue slot) of the episode the env plays with `env_seed` (see GOAL_SLOTS_X)."""
    env = SandboxEnv(render_mode=None, image_size=8)
    env.reset(seed=env_seed)
    return tuple(GOAL_SLOTS_X.index(float(env.goals[colour][0])) for colour in COLOURS)


def in_layout_set(env_seed: int, layouts: str) -> bool:
    """Whether the episode of `env_seed` belongs to `layouts`: "all", "train" (not held out) or
    "heldout" (HELDOUT_LAYOUTS)."""
    if layouts not in LAYOUT_SETS:
        raise ValueError(f"unknown layout set {layouts!r}; choose one of {LAYOUT_SETS}")
    return layouts == "all" or (layout_of(env_seed) in HELDOUT_LAYOUTS) == (layouts == "heldout")


def eval_seeds(episodes: int, seed: int = 0, split: str = "dev", layouts: str = "all") -> list[int]:
    """The env seeds of an evaluation: the first `episodes` of `split`'s range (for `seed`) whose
    layout is in `layouts`. Every policy evaluated with the same arguments meets the same seeds."""
    return _first_seeds(lambda i: eval_episode_seed(seed, i, split), episodes, layouts)


def train_seeds(episodes: int, seed: int = 0, layouts: str = "all") -> list[int]:
    """The env seeds of a dataset's episodes: the first `episodes` of the training range (for
    `seed`) whose layout is in `layouts` ("all": train_episode_seed(seed, i) for i < episodes)."""
    return _first_seeds(lambda i: train_episode_seed(seed, i), episodes, layouts)


def visited_seeds(episodes: int, seed: int = 0, layouts: str = "all") -> list[int]:
    """The env seeds of the teacher's own rollouts recorded for training (`reflow.visited_episodes`):
    the first `episodes` of the visited range (for `seed`) whose layout is in `layouts`."""
    return _first_seeds(lambda i: _episode_seed(VISITED_SEED_OFFSET, seed, i), episodes, layouts)


def _first_seeds(episode_seed, episodes: int, layouts: str) -> list[int]:
    if layouts not in LAYOUT_SETS:  # checked before the loop: it would never end
        raise ValueError(f"unknown layout set {layouts!r}; choose one of {LAYOUT_SETS}")
    seeds, episode = [], 0
    while len(seeds) < episodes:
        env_seed = episode_seed(episode)
        if in_layout_set(env_seed, layouts):
            seeds.append(env_seed)
        episode += 1
    return seeds


def colour_of(instruction: str) -> str:
    """The goal colour an instruction names, e.g. "go to the red goal" -> "red"."""
    if instruction not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction {instruction!r}; expected one of {INSTRUCTIONS}")
    return COLOURS[INSTRUCTIONS.index(instruction)]


def segment_hits_obstacle(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the agent's disc touches the bar anywhere while moving from `a` to `b` (each (2,)).

    Slab test of the segment against the bar grown by the agent's radius.
    """
    x0, y0, x1, y1 = OBSTACLE
    lo = np.array([x0 - AGENT_RADIUS, y0 - AGENT_RADIUS])
    hi = np.array([x1 + AGENT_RADIUS, y1 + AGENT_RADIUS])
    d = b - a
    t_enter, t_exit = 0.0, 1.0
    for k in range(2):
        if abs(d[k]) < 1e-12:
            if not lo[k] <= a[k] <= hi[k]:
                return False
            continue
        t0, t1 = sorted(((lo[k] - a[k]) / d[k], (hi[k] - a[k]) / d[k]))
        t_enter, t_exit = max(t_enter, t0), min(t_exit, t1)
        if t_enter > t_exit:
            return False
    return True


def render_scene(agent: np.ndarray, goals: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Draw the scene: (size, size, 3) uint8, row 0 is the top (y=1)."""
    centres = (np.arange(size) + 0.5) / size
    x = centres[None, :]  # (1, size)
    y = centres[::-1, None]  # (size, 1): row 0 is the top
    image = np.empty((size, size, 3), np.uint8)
    image[:] = _BACKGROUND
    x0, y0, x1, y1 = OBSTACLE
    image[(x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)] = _OBSTACLE_RGB
    for colour, centre in goals.items():
        image[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= GOAL_RADIUS**2] = GOAL_RGB[colour]
    image[(x - agent[0]) ** 2 + (y - agent[1]) ** 2 <= _AGENT_DRAW_RADIUS**2] = _AGENT_RGB
    return image


class SandboxEnv(gym.Env):
    """Go around the bar to the goal the instruction names.

    Observation: {"pixels": (64, 64, 3) uint8, "agent_pos": (2,) float32 in [0, 1]}.
    Action: (2,) float32 displacement; its length is capped at MAX_STEP.
    `task` / `task_description` hold this episode's instruction (also `info["task"]`);
    `reset(options={"task": ...})` fixes it, otherwise it is drawn from the seed.
    `info["is_success"]` says whether the agent has reached the instructed goal,
    `info["collision"]` whether it has touched the bar.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self, render_mode: str | None = "rgb_array", image_size: int = IMAGE_SIZE, render_size: int = RENDER_SIZE
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.image_size = image_size
        self.render_size = render_size
        self.observation_space = spaces.Dict(
            {
                "pixels": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
                "agent_pos": spaces.Box(0.0, 1.0, (2,), np.float32),
            }
        )
        self.action_space = spaces.Box(-MAX_STEP, MAX_STEP, (2,), np.float32)
        self.agent = np.array(START, np.float64)
        self.goals: dict[str, np.ndarray] = {}
        self.task = INSTRUCTIONS[0]
        self.steps = 0

    @property
    def task_description(self) -> str:
        return self.task

    @property
    def goal(self) -> np.ndarray:
        """Centre (2,) of the instructed goal."""
        return self.goals[colour_of(self.task)]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self.agent = np.array(START) + rng.uniform(-START_JITTER, START_JITTER, 2)
        self.goals = dict(zip(COLOURS, self._draw_goals(rng)))
        task = (options or {}).get("task")
        self.task = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))] if task is None else task
        colour_of(self.task)  # validates a task given in options
        self.steps = 0
        return self._observation(), self._info(success=False, collision=False)

    @staticmethod
    def _draw_goals(rng: np.random.Generator) -> list[np.ndarray]:
        """Two goal centres (each (2,)) in two different slots."""
        slots = rng.choice(len(GOAL_SLOTS_X), size=len(COLOURS), replace=False)
        return [np.array([GOAL_SLOTS_X[i], GOAL_Y]) for i in slots]

    def step(self, action):
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 2 finite numbers, got {action!r}")
        length = np.linalg.norm(action)
        if length > MAX_STEP:
            action = action * (MAX_STEP / length)
        target = np.clip(self.agent + action, 0.0, 1.0)
        collided = segment_hits_obstacle(self.agent, target)
        self.agent = target
        self.steps += 1
        success = not collided and np.linalg.norm(self.agent - self.goal) <= GOAL_RADIUS
        terminated = bool(success or collided)
        truncated = not terminated and self.steps >= MAX_EPISODE_STEPS
        info = self._info(success, collided)
        return self._observation(), float(success), terminated, truncated, info

    def _observation(self) -> dict[str, np.ndarray]:
        return {
            "pixels": render_scene(self.agent, self.goals, self.image_size),
            "agent_pos": self.agent.astype(np.float32),
        }

    def _info(self, success: bool, collision: bool) -> dict:
        return {"is_success": bool(success), "collision": bool(collision), "task": self.task}

    def render(self) -> np.ndarray:
        """(render_size, render_size, 3) uint8 frame of the current scene."""
        return render_scene(self.agent, self.goals, self.render_size)


def register() -> None:
    """Register ENV_ID with gymnasium (once per process)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point=f"{__name__}:SandboxEnv")
