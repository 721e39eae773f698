#!/usr/bin/env bash
# The study "does HySparK pre-training pay?" on synthetic CT (46 minutes measured on 2 CPU cores; see the README):
# synthesize 12 labelled + 48 unlabeled cases -> plan/preprocess (HySparK's and nnU-Net's plans) -> pre-train
# HySparK -> hyspark_benchmark folds (nnU-Net / HySparK scratch / HySparK fine-tuned, label fractions 0.25
# and 1, 3 folds) -> hyspark_benchmark summarize. Results: study_output/benchmark/summary.md and figures.
# Arguments go to the study (`--help`): e.g. --smoke (a few minutes, checks the pipeline), -o DIR, --force.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m nnunet_hyspark.cli.study "$@"
