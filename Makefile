# The two commands that matter: `make demo` (main job on the built-in dataset) and `make test`.
# Both run the idempotent set-up first (seconds when everything is in place).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean-venv

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# pyflakes, import order, bugbear and style (configuration: pyproject.toml)
lint: setup
	.venv/bin/ruff check .

clean-venv:
	rm -rf .venv
