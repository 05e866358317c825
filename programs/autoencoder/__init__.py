"""A deterministic autoencoder on binarised 8x8 digits, for comparison with the VAE.

:mod:`.model` holds the networks and the BCE loss; :mod:`.experiment`
training, the figure and :func:`run`. Run it with ``python -m programs
autoencoder``.
"""

from programs.autoencoder.experiment import (
    BATCH_SIZE,
    DESCRIPTION,
    LEARNING_RATE,
    TrainedAutoencoder,
    best_of_class,
    run,
    train_autoencoder,
)
from programs.autoencoder.model import (
    Autoencoder,
    CodeEncoder,
    bce,
    interpolate,
    loss_fn,
)

__all__ = [
    "BATCH_SIZE",
    "DESCRIPTION",
    "LEARNING_RATE",
    "Autoencoder",
    "CodeEncoder",
    "TrainedAutoencoder",
    "best_of_class",
    "bce",
    "interpolate",
    "loss_fn",
    "run",
    "train_autoencoder",
]
