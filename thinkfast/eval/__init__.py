"""Evaluation: grading (grading.py), inference-scaling metrics (metrics.py), samples files (samples.py), reward
models (reward.py), time budgets (budget.py), reports (report.py) and the file-level glue of `thinkfast score` and
`thinkfast train-rm` (scoring.py). Import the submodules directly; nothing heavy loads until it is used."""
