# A Coix script: one import line differs.
import jax
import numpyro
import numpyro.distributions as dist

import combinators as coix  # was: import coix

coix.set_backend("coix.numpyro")  # accepted: numpyro is the one backend
N = 64


def proposal():
    with numpyro.plate("particles", N):
        return (numpyro.sample("z", dist.Normal(0.0, 2.0)),)


def target():
    with numpyro.plate("particles", N):
        z = numpyro.sample("z", dist.Normal(1.0, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=1.5)
    return (z,)


def kernel(z):  # a forward kernel: moves z
    with numpyro.plate("particles", N):
        return (numpyro.sample("z", dist.Normal(z + 0.1, 0.5)),)


def reverse(z):  # its reverse kernel: scores the value it replaced
    with numpyro.plate("particles", N):
        numpyro.sample("z", dist.Normal(z - 0.1, 0.5))


q = coix.resample(coix.propose(target, proposal))
program = coix.propose(
    coix.extend(target, reverse),
    coix.compose(kernel, q),
    loss_fn=coix.loss.iwae_loss,
)
run = jax.jit(lambda key: coix.traced_evaluate(program, seed=key)())
out, trace, metrics = run(jax.random.key(0))
print(metrics["log_Z"], metrics["ess"], metrics["loss"])

# The older value of a re-sampled site (Coix: trace["z_PREV_"]):
key = jax.random.key(1)
_, q_trace, _ = coix.traced_evaluate(coix.compose(kernel, q), seed=key)()
previous = q_trace.history("z")[1]
