"""The two-moons VAE: the model in ``model.py``, the experiment in ``experiment.py``.

Run it with ``python -m programs vae_moons``.
"""

from programs.vae_moons.experiment import (
    DESCRIPTION,
    LEARNING_RATE,
    NOISE,
    NUM_TEST,
    NUM_TRAIN,
    evaluate,
    load_data,
    plot,
    run,
)
from programs.vae_moons.model import (
    ENCODER_SCALE,
    HIDDEN,
    LATENT_DIM,
    MLP,
    VAE,
    decoder,
    encoder,
    in_particle_plate,
    loss_fn,
    make_program,
    prior,
    program_metrics,
)

__all__ = [
    "DESCRIPTION",
    "ENCODER_SCALE",
    "HIDDEN",
    "LATENT_DIM",
    "LEARNING_RATE",
    "MLP",
    "NOISE",
    "NUM_TEST",
    "NUM_TRAIN",
    "VAE",
    "decoder",
    "encoder",
    "evaluate",
    "in_particle_plate",
    "load_data",
    "loss_fn",
    "make_program",
    "plot",
    "prior",
    "program_metrics",
    "run",
]
