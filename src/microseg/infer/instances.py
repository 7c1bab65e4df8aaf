"""Re-export of the U-Net family's predictor (moved to :mod:`microseg.models.unet.predict`).

Kept because MLflow models registered before the move import these names from here in their
``load_context``; drop it once no registered ``champion``/``challenger`` predates the move.
"""

from microseg.models.unet.predict import (  # noqa: F401
    InferConfig,
    object_stats,
    predict_dataset,
    predict_instances,
    predict_probs,
)
