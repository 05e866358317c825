# The same model and guide as importance samplers with 16 particles.
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax

import combinators as coix

y = jnp.array([1.8, 2.4, 2.1, 1.6, 2.7])
K = 16  # particles: a plate, outermost


def model(y):
    with numpyro.plate("particles", K, dim=-2):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("data", len(y), dim=-1):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def guide(params, y):  # parameters are arguments
    scale = jax.nn.softplus(params["scale"])
    with numpyro.plate("particles", K, dim=-2):
        numpyro.sample("mu", dist.Normal(params["loc"], scale))


def loss_fn(params, key, y):
    program = coix.propose(
        model,
        lambda y: guide(params, y),
        loss_fn=coix.loss.elbo_loss,  # iwae_loss: the IWAE bound
    )
    _, _, metrics = coix.traced_evaluate(program, seed=key)(y)
    return metrics["loss"], metrics


params = {"loc": jnp.zeros(()), "scale": jnp.zeros(())}
params, metrics = coix.util.train(
    loss_fn, params, optax.adam(0.05), 500, y=y, progress=False
)
print(params["loc"], jax.nn.softplus(params["scale"]))
