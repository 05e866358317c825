# A Bernoulli VAE with an amortised encoder, trained with optax.
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import combinators as coix
from combinators import amortized as am


class MLP(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out)(nn.relu(nn.Dense(128)(x)))


d_x, d_z = 64, 2
encoder, decoder = MLP(2 * d_z), MLP(d_x)
guide = am.InferenceNetwork(am.from_apply(encoder.apply, am.diagonal_normal))
model = am.GenerativeModel(
    am.standard_normal(d_z),
    am.from_apply(decoder.apply, am.bernoulli_logits),
)
# elbo_loss with K = 1; loss_fn=coix.loss.iwae_loss, K = 5: an IWAE
loss_fn = am.make_loss_fn(model, guide, num_particles=1)

key_p, key_q, key_x = jax.random.split(jax.random.key(0), 3)
params = am.AmortizedParams(
    p=decoder.init(key_p, jnp.zeros((1, d_z))),
    q=encoder.init(key_q, jnp.zeros((1, d_x))),
)
# Stand-in data: 30 batches of 16 binary vectors.
x = jax.random.bernoulli(key_x, 0.3, (30, 16, d_x))
result = coix.util.train(
    loss_fn,
    params,
    optax.adam(1e-3),
    30,
    dataloader=iter(x.astype(jnp.float32)),
    progress=False,
    return_result=True,
)
print(result.history["elbo"][-1])
