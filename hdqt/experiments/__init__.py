"""Experiments: the `hdqt run` command (config, runner with resume, reports).

``resolve_config`` builds a validated ``RunConfig``; ``run_experiment`` runs it
task by task in an output directory and resumes from the last checkpoint.
"""
