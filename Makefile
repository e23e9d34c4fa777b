# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: setup main test

setup:
	bash scripts/setup.sh

# Generate SynthPedes, train stage 1 then stage 2, evaluate per round, export a Hub folder.
main: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m diana.training.main_job --output_dir outputs/main_job

# The whole test suite, offline.
test:
	bash scripts/setup.sh --browser
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -n 2 --dist loadgroup -q tests
