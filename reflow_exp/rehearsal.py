"""The shipped SmolVLA path rehearsed at its real shape, on the CPU, with nothing downloaded::

    python -m reflow_exp.rehearsal [--root runs/rehearsal]      (or `make rehearsal`)

It makes, from a seed:
- a teacher shaped like `lerobot/smolvla_base` after a user's fine-tune: the real SmolVLM2-500M
  architecture with random weights, SmolVLA's defaults (three cameras `camera1..3` at 512x512 resize
  with padding, chunk 50, 6-D state and action, `empty_cameras=0`), saved as `lerobot-train` saves a
  checkpoint (`checkpoints/last/pretrained_model`: weights, config, processors);
- an SO-100-shaped LeRobotDataset v3, recorded with LeRobot's API: two video cameras `top` and
  `wrist` at 480x640, 30 fps, 6-D state and action, a text task, a few short episodes.

Then it runs what a SmolVLA user runs: `gin/smolvla/reflow.gin` unchanged, with only the bindings
such a user sets (teacher, dataset, rename_map, few steps, a small batch), with the image embedding
cache and without; `examples/train_2rf_with_teacher.sh` with the seed's flags; and LeRobot's own
`SmolVLAPolicy.select_action` on the exported student. Each reflow log is shown as it runs.

It writes `<root>/report.json` (see `main`) and exits 1 unless every check holds. The data are
shrunk, never the model: the point is the real shapes and sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lerobot.configs.types import FeatureType, PolicyFeature

from reflow_exp.architectures import SHIPPED, make_smolvla_config
from reflow_exp.data import DataSource, dataset_stats, open_metadata
from reflow_exp.files import build_once
from reflow_exp.gin_config import GIN_DIR

REPO = GIN_DIR.parent
VLM_ID = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
REPO_ID = "rehearsal/so100"
TEACHER_CAMERAS = [f"observation.images.camera{i}" for i in (1, 2, 3)]  # smolvla_base's
DATASET_CAMERAS = ["observation.images.top", "observation.images.wrist"]  # the SO-100 datasets'
RENAME_MAP = dict(zip(DATASET_CAMERAS, TEACHER_CAMERAS))  # what a user passes: camera3 stays unfed
JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
TASK = "Pick up the cube and place it in the bin."
EPISODES, FRAMES, FPS, HEIGHT, WIDTH = 3, 6, 30, 480, 640
SEED_LINES = ("[Reflow] Total parameters: 450,046,176", "[Reflow] Trainable parameters: 99,880,992 (22.19%)")


# ----------------------------------------------------------------------------- what a user brings
def record_so100(root: Path, seed: int = 0) -> Path:
    """An SO-100-shaped LeRobotDataset v3 at `root` (made once): two 480x640 video cameras, 6-D state
    and action (joint positions; the action is the next state), EPISODES episodes of FRAMES frames."""
    from reflow_exp.sandbox.dataset import episode_writer

    camera = {"dtype": "video", "shape": (HEIGHT, WIDTH, 3), "names": ["height", "width", "channels"]}
    joints = {"dtype": "float32", "shape": (6,), "names": JOINTS}
    spec = {**{key: camera for key in DATASET_CAMERAS}, "observation.state": joints, "action": joints}

    def build(work: Path) -> dict:
        rng = np.random.default_rng(seed)
        with episode_writer(work, REPO_ID, FPS, spec) as add_episode:
            for _ in range(EPISODES):
                phase, speed = rng.uniform(0, 2 * np.pi, 6), rng.uniform(0.5, 1.5, 6)
                states = [np.sin(phase + speed * t / FPS).astype(np.float32) for t in range(FRAMES + 1)]
                add_episode([_so100_frame(states[t], states[t + 1]) for t in range(FRAMES)])
        return {"episodes": EPISODES, "frames": EPISODES * FRAMES}

    build_once(root, {"kind": "rehearsal_so100", "seed": seed, "episodes": EPISODES, "frames": FRAMES}, build)
    return root


def _so100_frame(state: np.ndarray, action: np.ndarray) -> dict:
    """Two camera views of a square whose place follows the first two joints; (480, 640, 3) uint8."""
    top = np.full((HEIGHT, WIDTH, 3), 40, np.uint8)
    y, x = int((state[0] + 1) / 2 * (HEIGHT - 80)), int((state[1] + 1) / 2 * (WIDTH - 80))
    top[y : y + 80, x : x + 80] = (220, 80, 40)
    wrist = np.ascontiguousarray(top[::-1, ::-1])
    cameras = {DATASET_CAMERAS[0]: top, DATASET_CAMERAS[1]: wrist}
    return {**cameras, "observation.state": state, "action": action, "task": TASK}


def teacher_config(vlm: str | Path):
    """smolvla_base's SmolVLAConfig on `vlm`: SmolVLA's defaults, three cameras resized to 512x512, 6-D state
    and action."""
    features = {key: PolicyFeature(FeatureType.VISUAL, (3, 512, 512)) for key in TEACHER_CAMERAS}
    features |= {"observation.state": PolicyFeature(FeatureType.STATE, (6,))}
    features |= {"action": PolicyFeature(FeatureType.ACTION, (6,))}
    return make_smolvla_config(vlm, features, device="cpu")


def make_teacher(root: Path, dataset: Path, seed: int = 0) -> Path:
    """A smolvla_base-shaped SmolVLA with random weights, saved as `lerobot-train` saves a fine-tune
    on `dataset` (its statistics in the processors) into `root/teacher`; returns its
    `pretrained_model` folder. Its VLM, `root/vlm`, is the real SmolVLM2-500M config (with the
    sandbox's placeholder tokenizer: nothing here is meant to be learnt)."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    vlm = shutil.copytree(SHIPPED[VLM_ID], root / "vlm", dirs_exist_ok=True)  # the processors name this path
    pretrained = Path("checkpoints") / "last" / "pretrained_model"

    def build(work: Path) -> dict:
        config = teacher_config(vlm)
        torch.manual_seed(seed)
        print("[Rehearsal] Building the smolvla_base-shaped teacher (random weights) ...", flush=True)
        policy = SmolVLAPolicy(config)
        meta = open_metadata(DataSource(str(vlm), REPO_ID, str(dataset), rename_map=RENAME_MAP))
        pre, post = make_smolvla_pre_post_processors(config, dataset_stats=dataset_stats(meta, RENAME_MAP))
        for part in (policy, pre, post):
            part.save_pretrained(work / pretrained)
        return {"cameras": TEACHER_CAMERAS}

    build_once(root / "teacher", {"kind": "rehearsal_teacher", "seed": seed, "dataset": str(dataset)}, build)
    return root / "teacher" / pretrained


# ----------------------------------------------------------------------------- what a user runs
def run_logged(command: list[str], log: Path) -> tuple[int, str]:
    """Run `command` from the repo root, showing its output as it comes (indented); returns
    (exit code, output). The output is also written to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHON"] = sys.executable  # the seed's script runs $PYTHON
    print(f"[Rehearsal] $ {' '.join(command)}", flush=True)
    lines = []
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for line in process.stdout:
            lines.append(line)
            print(f"    | {line}", end="", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(lines))
    return process.returncode, "".join(lines)


def reflow_command(teacher: Path, dataset: Path, runs: Path, name: str, cache: bool, steps: int) -> list[str]:
    """The shipped config with a user's bindings: teacher, dataset, rename_map, few steps, small batch."""
    params = {
        "reflow.teacher": f'"{teacher}"',
        "lerobot_source.repo_id": f'"{REPO_ID}"',
        "lerobot_source.root": f'"{dataset}"',
        "lerobot_source.rename_map": json.dumps(RENAME_MAP),
        "reflow.batch_size": "2",
        "reflow.holdout_episodes": "1",
        "reflow.offline_batches": "1",
        "reflow.image_embedding_cache": str(cache),
        "ImageEmbeddingCache.folder": f'"{runs / "embedding_cache"}"',
        "Trainer.steps": str(steps),
        "Trainer.log_every": "1",
        "run.runs_dir": f'"{runs}"',
        "run.name": f'"{name}"',
    }
    command = [sys.executable, "-m", "reflow_exp.run", "--gin_file", "gin/smolvla/reflow.gin"]
    for key, value in params.items():
        command += ["--gin_param", f"{key} = {value}"]
    return command


def script_command(teacher: Path, dataset: Path, runs: Path, steps: int) -> list[str]:
    """`examples/train_2rf_with_teacher.sh` with the seed's flags (and the dataset's folder and rename_map)."""
    return [
        "bash",
        "examples/train_2rf_with_teacher.sh",
        f"--policy.teacher_model_path={teacher}",
        "--policy.use_reflow=true",
        "--batch_size=2",
        f"--steps={steps}",
        f"--save_freq={steps}",
        f"--output_dir={runs / 'script'}",
        "--policy.optimizer_lr=1e-4",
        "--policy.freeze_vision_encoder=true",
        f"--dataset.repo_id={REPO_ID}",
        f"--dataset.root={dataset}",
        f"--rename_map={json.dumps(RENAME_MAP)}",
        "--gin_param=reflow.holdout_episodes = 1",
        "--gin_param=reflow.offline_batches = 1",
        f'--gin_param=ImageEmbeddingCache.folder = "{runs / "embedding_cache"}"',
    ]


def lerobot_select_action(student: Path, dataset: Path) -> torch.Tensor:
    """One action from LeRobot's own loader, processors and `select_action` on the exported student,
    for the dataset's first frame (its keys renamed by LeRobot's rename step, as `lerobot-eval` does)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    policy = SmolVLAPolicy.from_pretrained(str(student)).eval()
    overrides = {"device_processor": {"device": "cpu"}, "rename_observations_processor": {"rename_map": RENAME_MAP}}
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(student), preprocessor_overrides=overrides)
    item = LeRobotDataset(REPO_ID, root=dataset)[0]
    batch = {key: item[key][None] for key in [*DATASET_CAMERAS, "observation.state"]} | {"task": [item["task"]]}
    with torch.no_grad():
        return post(policy.select_action(pre(batch)))


# ----------------------------------------------------------------------------- the report
def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def log_counts(log: str) -> dict:
    """The start-up parameter lines of a reflow log, as numbers."""
    total = next(line for line in log.splitlines() if line.startswith("[Reflow] Total parameters:"))
    trainable = next(line for line in log.splitlines() if line.startswith("[Reflow] Trainable parameters:"))
    return {
        "total_parameters": int(total.split(":")[1].replace(",", "")),
        "trainable_parameters": int(trainable.split(":")[1].split("(")[0].replace(",", "")),
    }


def peak_rss_gb() -> float:
    """The largest resident set of this process and of any child it waited for (Linux: KiB)."""
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kib / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflow_exp.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/rehearsal", help="where the teacher, data, runs and report go")
    parser.add_argument("--steps", type=int, default=2, help="reflow steps per run")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = Path(args.root).resolve()
    runs = root / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # every rehearsal trains afresh (a kept run would resume)

    print("[Rehearsal] 1/5 SO-100-shaped dataset and smolvla_base-shaped teacher", flush=True)
    dataset = record_so100(root / "so100")
    teacher = make_teacher(root, dataset)

    results = {}
    for step, (name, cache) in enumerate((("with-cache", True), ("no-cache", False)), start=2):
        print(f"[Rehearsal] {step}/5 gin/smolvla/reflow.gin, image embedding cache {'on' if cache else 'off'}")
        command = reflow_command(teacher, dataset, runs, name, cache, args.steps)
        results[name] = run_logged(command, root / "logs" / f"{name}.txt")
    print("[Rehearsal] 4/5 examples/train_2rf_with_teacher.sh with the seed's flags", flush=True)
    results["script"] = run_logged(script_command(teacher, dataset, runs, args.steps), root / "logs" / "script.txt")

    print("[Rehearsal] 5/5 LeRobot's SmolVLAPolicy.select_action on the exported student", flush=True)
    run = runs / "with-cache"
    summary = json.loads((run / "summary.json").read_text())
    student = Path(summary["student_checkpoint"])
    action = lerobot_select_action(student, dataset)
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    cache_files = list((runs / "embedding_cache").glob("*.safetensors"))
    logs = {name: output for name, (_, output) in results.items()}
    report = {
        "teacher_cameras": TEACHER_CAMERAS,
        "dataset_cameras": DATASET_CAMERAS,
        "cameras_used": [RENAME_MAP[key] for key in DATASET_CAMERAS],
        **log_counts(logs["with-cache"]),
        "vlm_load_count": summary["vlm_load_count"],
        "student_num_steps": json.loads((student / "config.json").read_text())["num_steps"],
        "action_shape": list(action.shape),
        "action_finite": bool(torch.isfinite(action).all()),
        "eval_skipped": summary.get("eval_skipped"),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "wall_s": round(time.perf_counter() - start, 1),
        "bytes": {
            "teacher": folder_bytes(teacher),
            "checkpoint": folder_bytes(checkpoints[-1]),
            "student": folder_bytes(student),
            "embedding_cache": sum(f.stat().st_size for f in cache_files),
        },
        "exit_codes": {name: code for name, (code, _) in results.items()},
    }
    checks = {
        "every run exited 0": all(code == 0 for code in report["exit_codes"].values()),
        "every reflow log holds the seed's two lines": all(
            all(line in log.splitlines() for line in SEED_LINES) for log in logs.values()
        ),
        "the VLM loaded once": report["vlm_load_count"] == 1,
        "the student samples in 1 step": report["student_num_steps"] == 1,
        "one finite 6-D action": report["action_shape"] == [1, 6] and report["action_finite"],
        "the cache was built and used": bool(cache_files) and "Image embeddings:" in logs["with-cache"],
        "no cache when turned off": "Image embeddings:" not in logs["no-cache"],
    }
    report = {"ok": all(checks.values()), "checks": checks, **report}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"[Rehearsal] {'PASSED' if report['ok'] else 'FAILED'} in {report['wall_s']:.0f} s; {root / 'report.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
