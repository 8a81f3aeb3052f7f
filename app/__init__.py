"""The reflow_exp dashboard: launch ``reflow_exp.run`` jobs on a chosen device and watch their
run folders (log, metrics, summary, evaluation media), with Aim as the explorer.

Start it with ``reflow-dashboard [--host 127.0.0.1] [--port P] [--runs-dir runs]`` (or
``make dashboard``). Modules:

- ``app.forms``     the launch form: gin files, overrides, run names, the command, dry-run errors
- ``app.runs``      reading run folders: status, metrics, summary, log, media
- ``app.processes`` is a process alive, and the same one (psutil)
- ``app.runner``    launching (validated by a dry run) and stopping runs as child processes
- ``app.launcher``  the tiny wrapper each run executes under; records the exit code
- ``app.gpus``      the GPU list from nvidia-smi
- ``app.aim_server`` ``aim up`` on demand
- ``app.views``     status pills, headers, messages, the runs table (HTML and data frames)
- ``app.dashboard`` the handlers: launch, stop, follow a log, the run page, the runs table
- ``app.ui``        the Gradio Blocks: layout and wiring
- ``app.main``      the console script

Importing this package is cheap (no gradio, no torch): the launcher wrapper imports it.
"""
