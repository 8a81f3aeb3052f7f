"""Jobs and the gin-bound builders they use: the edge where gin meets the model code.

A job is `job(run: RunDir, dry_run=False) -> None`; `python -m reflow_exp.run` calls the one bound to
`run.job`. Builders that are *referenced* in gin (`train_teacher.source = @sandbox_source`) run inside
the job, after the configuration was validated and the run folder exists. Gin registers each
configurable by its function name, so these names are the gin file's vocabulary.

- `sources`     sandbox_source, metaworld_source, lerobot_source -> DataSource
- `builders`    smolvla_config (gin), student_head, param_summary
- `teacher`     train_teacher (1-RF) and the data split it records
- `reflow_job`  reflow (2-RF): teacher -> student, offline metrics, rollouts
- `evaluate`    evaluate_policies, evaluate_metaworld and the rollouts every job ends with
- `report`      paired comparisons, the plain-text tables and the sandbox's quality bar
"""

from reflow_exp.jobs.builders import param_summary, smolvla_config, student_head
from reflow_exp.jobs.evaluate import EPISODES_FILE, evaluate_metaworld, evaluate_policies, evaluate_rollouts
from reflow_exp.jobs.reflow_job import reflow, teacher_saw
from reflow_exp.jobs.report import PAIRS, eval_table, paired_comparisons, paired_table, quality_bar
from reflow_exp.jobs.sources import lerobot_source, metaworld_source, sandbox_source
from reflow_exp.jobs.teacher import data_split, train_teacher

__all__ = [
    "EPISODES_FILE",
    "PAIRS",
    "data_split",
    "eval_table",
    "evaluate_metaworld",
    "evaluate_policies",
    "evaluate_rollouts",
    "lerobot_source",
    "metaworld_source",
    "paired_comparisons",
    "paired_table",
    "param_summary",
    "quality_bar",
    "reflow",
    "sandbox_source",
    "smolvla_config",
    "student_head",
    "teacher_saw",
    "train_teacher",
]
