"""`python scripts/real_checkpoint_sizes.py`: checkpoint and cache sizes at SmolVLA's real shape (issue 22).

A reflow of the rehearsal's smolvla_base-shaped teacher on its SO-100-shaped data (`reflow_exp.rehearsal`),
2 steps with a save after each: the slim checkpoint (step 1), the full last one (step 2), the student and
the bfloat16 image cache, in bytes, into runs/rehearsal_sizes/slim_report.json.
"""

import json
import sys
from pathlib import Path

from reflow_exp.rehearsal import folder_bytes, make_teacher, record_so100, reflow_command, run_logged

root = Path("runs/rehearsal_sizes").resolve()
runs = root / "runs"
dataset = record_so100(root / "so100")
teacher = make_teacher(root, dataset)
command = reflow_command(teacher, dataset, runs, "slim", True, 2) + ["--gin_param", "Trainer.save_every = 1"]
code, _ = run_logged(command, root / "logs" / "slim.txt")
run = runs / "slim"
checkpoints = run / "checkpoints"
summary = json.loads((run / "summary.json").read_text())
report = {
    "exit_code": code,
    "checkpoints": sorted(p.name for p in checkpoints.iterdir()),
    "slim_checkpoint_bytes": folder_bytes(checkpoints / "000001"),
    "slim_has_pretrained_model": (checkpoints / "000001" / "pretrained_model").exists(),
    "full_checkpoint_bytes": folder_bytes(checkpoints / "000002"),
    "student_bytes": folder_bytes(run / "student"),
    "teacher_bytes": folder_bytes(teacher),
    "image_embedding_cache": summary.get("image_embedding_cache"),
}
report["slim_vs_student"] = report["slim_checkpoint_bytes"] / report["student_bytes"]
(root / "slim_report.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
sys.exit(code)
