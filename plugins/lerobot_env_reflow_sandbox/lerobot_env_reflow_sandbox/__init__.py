"""LeRobot env plugin: `lerobot-eval --env.type=reflow_sandbox` rolls policies out in reflow_exp's sandbox.

LeRobot's CLIs import this package by its distribution Name; importing it registers the env type.
`lerobot-eval --seed=S` plays env seeds S, S+1, ...: `--seed=2000000000` is the sandbox's report range
(`reflow_exp.sandbox.task.eval_seeds(n, 0, "report")`), `--seed=1000000000` the development range.
"""

from .configuration_reflow_sandbox import ReflowSandboxEnv

__all__ = ["ReflowSandboxEnv"]
