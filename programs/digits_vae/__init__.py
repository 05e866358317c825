"""A Bernoulli variational autoencoder on binarised 8x8 digits (Kingma & Welling).

:mod:`.model` holds the networks, the model and its loss
(:mod:`combinators.amortized`); :mod:`.experiment` training, evaluation,
the figure and :func:`run`. Run it with ``python -m programs digits_vae``.
"""

from programs.digits_vae.experiment import (
    BATCH_SIZE,
    DESCRIPTION,
    EVAL_PARTICLES,
    IWAE_PARTICLES,
    LEARNING_RATE,
    TrainedVAE,
    evaluate,
    run,
    train_vae,
)
from programs.digits_vae.model import (
    HIDDEN,
    LATENT_DIM,
    VAE,
    Decoder,
    Encoder,
    init_params,
    kl_to_prior,
    make_loss_fn,
    make_vae,
)

__all__ = [
    "BATCH_SIZE",
    "DESCRIPTION",
    "EVAL_PARTICLES",
    "HIDDEN",
    "IWAE_PARTICLES",
    "LATENT_DIM",
    "LEARNING_RATE",
    "VAE",
    "Decoder",
    "Encoder",
    "TrainedVAE",
    "evaluate",
    "init_params",
    "kl_to_prior",
    "make_loss_fn",
    "make_vae",
    "run",
    "train_vae",
]
