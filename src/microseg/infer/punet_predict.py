"""Re-export of the Prob-UNet family's predictor (moved to :mod:`microseg.models.punet.predict`).

Kept because MLflow models registered before the move import these names from here in their
``load_context``; drop it once no registered ``champion``/``challenger`` predates the move.
"""

from microseg.models.punet.predict import (  # noqa: F401
    STATS,
    bernoulli_entropy_from_logits,
    mask_name,
    predict_stack_punet,
    remove_small,
    write_predictions,
)
