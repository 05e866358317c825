# NumPyro SVI: a normal mean with a mean-field guide.
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO

y = jnp.array([1.8, 2.4, 2.1, 1.6, 2.7])


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("data", len(y)):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def guide(y):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))


svi = SVI(
    model,
    guide,
    numpyro.optim.Adam(0.05),
    Trace_ELBO(num_particles=16),
)
result = svi.run(jax.random.key(0), 500, y, progress_bar=False)
print(result.params["loc"], result.params["scale"])
