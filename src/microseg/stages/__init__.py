"""Stage orchestration: what one ``dvc.yaml`` stage does, in one function each.

A stage function reads its validated params section, calls the library (io, data, models,
train, infer, evaluate, report), writes its outputs atomically and returns the metrics it
produced. ``cli.py`` only opens the MLflow run around it, so the same function is what tests,
``MLproject`` entry points and Optuna studies call.
"""
