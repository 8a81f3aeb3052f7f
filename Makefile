# The two commands the README opens with: `make demo` and `make test`.
# Each creates and fills .venv on first use (Python 3.12, pinned packages) and skips that afterwards.
PYTHON ?= python3.12
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export NO_PROXY := localhost,127.0.0.1

.PHONY: demo test rehearsal setup clean dashboard browser ffmpeg gpu-check gl bench-metaworld

setup: $(STAMP) ffmpeg

# LeRobot plugins (lerobot-train --policy.type=smolvla_reflow, lerobot-eval --env.type=reflow_sandbox),
# installed editable from this checkout: LeRobot's CLIs find them by their distribution Name.
PLUGINS := plugins/lerobot_policy_smolvla_reflow plugins/lerobot_env_reflow_sandbox

$(STAMP): pyproject.toml constraints.txt $(foreach p,$(PLUGINS),$(p)/pyproject.toml)
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -c constraints.txt -e '.[dev,metaworld]'
	$(VENV)/bin/pip install -c constraints.txt $(foreach p,$(PLUGINS),-e ./$(p))
	@touch $(STAMP)

# The embedded CPU demo: tiny SmolVLM + sandbox data -> teacher (1-RF) -> reflow student, evaluated.
# Run folders: runs/sandbox-teacher, runs/sandbox-reflow (running again resumes / re-evaluates).
demo: $(STAMP) ffmpeg
	$(VENV)/bin/python -m reflow_exp.run --gin_file gin/sandbox/teacher.gin
	$(VENV)/bin/python -m reflow_exp.run --gin_file gin/sandbox/reflow.gin

# Lint and format check first (ruff, configured in pyproject.toml), then the tests.
test: $(STAMP) ffmpeg browser gl
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -q tests

# The shipped gin/smolvla/reflow.gin at its real shape on the CPU (smolvla_base-shaped teacher, SO-100-shaped
# video data, made locally): writes runs/rehearsal/report.json and fails unless every check holds.
rehearsal: $(STAMP) ffmpeg
	$(VENV)/bin/python -m reflow_exp.rehearsal

# The Gradio dashboard (binds 127.0.0.1; e.g. `make dashboard DASHBOARD_ARGS="--port 7860 --runs-dir runs"`).
DASHBOARD_ARGS ?=
dashboard: $(STAMP)
	$(VENV)/bin/reflow-dashboard $(DASHBOARD_ARGS)

# On a CUDA machine: tiny teacher + reflow in bf16, then the GPU benchmark, in under 8 minutes.
gpu-check: $(STAMP)
	PYTHON=$(VENV)/bin/python scripts/gpu_check.sh

# The browser test drives Debian's chromium (Playwright cannot download its own browsers here).
browser:
	@test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# MetaWorld renders offscreen with MUJOCO_GL=egl (the default in reflow_exp.metaworld): Mesa's EGL.
gl:
	@test -e /usr/lib/x86_64-linux-gnu/libEGL_mesa.so.0 || (apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri)

# record -> teacher -> reflow -> eval on five MetaWorld tasks; writes runs/bench/metaworld.json.
bench-metaworld: $(STAMP) gl
	$(VENV)/bin/python -m reflow_exp.bench metaworld

# torchcodec (LeRobot's video decoder) loads FFmpeg's shared libraries; Debian's ffmpeg provides them.
ffmpeg:
	@test -x /usr/bin/ffmpeg || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ffmpeg)

clean:
	rm -rf runs .pytest_cache
