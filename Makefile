# The two commands the README opens with: `make demo` and `make test`.
# Each creates and fills .venv on first use (Python 3.12, pinned packages) and skips that afterwards.
PYTHON ?= python3.12
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export NO_PROXY := localhost,127.0.0.1

.PHONY: demo test setup clean dashboard browser ffmpeg

setup: $(STAMP) ffmpeg

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# The embedded CPU demo: tiny SmolVLM + sandbox data -> teacher (1-RF) -> reflow student, evaluated.
# Run folders: runs/sandbox-teacher, runs/sandbox-reflow (running again resumes / re-evaluates).
demo: $(STAMP) ffmpeg
	$(VENV)/bin/python -m reflow_exp.run --gin_file gin/sandbox/teacher.gin
	$(VENV)/bin/python -m reflow_exp.run --gin_file gin/sandbox/reflow.gin

test: $(STAMP) ffmpeg browser
	$(VENV)/bin/python -m pytest -q tests

# The Gradio dashboard (binds 127.0.0.1; e.g. `make dashboard DASHBOARD_ARGS="--port 7860 --runs-dir runs"`).
DASHBOARD_ARGS ?=
dashboard: $(STAMP)
	$(VENV)/bin/reflow-dashboard $(DASHBOARD_ARGS)

# The browser test drives Debian's chromium (Playwright cannot download its own browsers here).
browser:
	@test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# torchcodec (LeRobot's video decoder) loads FFmpeg's shared libraries; Debian's ffmpeg provides them.
ffmpeg:
	@test -x /usr/bin/ffmpeg || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ffmpeg)

clean:
	rm -rf runs .pytest_cache
