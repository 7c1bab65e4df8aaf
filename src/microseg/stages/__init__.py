"""Stage orchestration: what one ``dvc.yaml`` stage does, in one function each.

A stage function reads its validated params section, calls the library (io, data, models,
train, infer, evaluate, report), writes its outputs atomically (metrics JSON, plots, reports)
and returns the metrics it produced. The ``run_*`` functions (``stages.data``,
``stages.training``, ``stages.evaluation``, ``stages.registry``) run a stage inside its MLflow
run (``stages.result.run_stage``; the MLflow calls are in ``registry``), and the ``cli``
commands call those, so the same function is what tests, ``MLproject`` entry points and
Optuna studies call.
"""
