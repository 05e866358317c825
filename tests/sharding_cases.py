"""Sharded and single-device runs of the same programs, for test_sharding.py.

The number of (simulated) devices is fixed when JAX starts, and pytest has
already started it with one CPU device, so ``tests/test_sharding.py`` runs
this file in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu``.
It prints one JSON object: for every case the values of the single-device
run (``"single"``), of the sharded run (``"sharded"``), and facts about the
sharded run (``"info"``: shardings, shard counts, collectives in the
compiled HLO). The test compares them; this file asserts nothing.

Every pair of runs uses the same key and the same ``jax_threefry_
partitionable`` setting (the default, True, except in the case that shows
why it matters). The single-device run is the unmodified program, jitted
with its inputs on one device.

Run by hand: ``XLA_FLAGS=--xla_force_host_platform_device_count=4
JAX_PLATFORMS=cpu PYTHONPATH=. python tests/sharding_cases.py``.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import combinators as coix
from combinators.flax_utils import BindModule
from combinators.loss import iwae_loss
from combinators.resampling import SCHEMES, resample_indices
from combinators.sharding import shard_plates
from programs import lgssm, vae_moons
from programs.lgssm_exact import default_params, simulate

NUM_DEVICES = 4
NUM_PARTICLES = 64  # 16 per device
DIM = 3
Y_OBS = np.array([0.5, -1.0, 2.0], np.float32)
PARTICLES = {"particles": "particles"}


def mesh_1d():
    """Four devices along one Auto axis, ``particles``."""
    return jax.make_mesh((NUM_DEVICES,), ("particles",), axis_types=(AxisType.Auto,))


def mesh_2d():
    """A 2 x 2 mesh: ``particles`` x ``data``."""
    return jax.make_mesh(
        (2, 2), ("particles", "data"), axis_types=(AxisType.Auto, AxisType.Auto)
    )


def replicate(tree, mesh):
    """Places every array of ``tree`` on all devices of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def collectives(compiled_text: str) -> dict[str, int]:
    """Counts of cross-device collectives in compiled HLO text."""
    kinds = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
    return {
        kind: len(re.findall(rf"\b{kind}(?:-start)?\(", compiled_text))
        for kind in kinds
    }


def run_compiled(fn, *inputs):
    """Compiles ``jax.jit(fn)`` for ``inputs`` once; its outputs and HLO text."""
    compiled = jax.jit(fn).lower(*inputs).compile()
    return compiled(*inputs), compiled.as_text()


def describe(x) -> dict:
    """How an array is laid out across devices."""
    return {
        "spec": str(getattr(x.sharding, "spec", None)),
        "num_shards": len(x.addressable_shards),
        "shard_shape": list(x.addressable_shards[0].data.shape),
        "shape": list(x.shape),
    }


def to_json(tree):
    """Array leaves as (nested) lists of Python numbers, flattened in order."""
    return [np.asarray(leaf).tolist() for leaf in jax.tree_util.tree_leaves(tree)]


# ---------------------------------------------------------------------------
# (1) importance sampling with an IWAE loss, particles sharded
# ---------------------------------------------------------------------------


def is_target(y):
    """``z ~ N(0, I)``, ``y ~ N(z, 0.5^2 I)`` (one observation, shared)."""
    with numpyro.plate("particles", NUM_PARTICLES):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([DIM]).to_event(1))
        numpyro.sample("y", dist.Normal(z, 0.5).to_event(1), obs=y)
    return (z,)


def is_proposal(params, y):
    """``z ~ N(loc, exp(log_scale)^2)``: the parameters get gradients."""
    del y
    with numpyro.plate("particles", NUM_PARTICLES):
        z = numpyro.sample(
            "z",
            dist.Normal(params["loc"], jnp.exp(params["log_scale"])).to_event(1),
        )
    return (z,)


def is_program(params, mesh=None):
    def q(y):
        return is_proposal(params, y)

    p = is_target
    if mesh is not None:
        p, q = shard_plates(p, mesh, PARTICLES), shard_plates(q, mesh, PARTICLES)
    return coix.propose(p, q, loss_fn=iwae_loss)


def is_loss(params, key, y, mesh=None):
    _, trace, metrics = coix.traced_evaluate(is_program(params, mesh), seed=key)(y)
    aux = {
        "log_Z": metrics["log_Z"],
        "ess": metrics["ess"],
        "log_weight": metrics["log_weight"],
        "z": trace["z"].value,
    }
    return metrics["loss"], aux


def case_importance() -> dict:
    mesh = mesh_1d()
    params = {"loc": jnp.array([0.1, -0.2, 0.3]), "log_scale": jnp.zeros(DIM)}
    key, y = jax.random.key(0), jnp.asarray(Y_OBS)
    step = jax.value_and_grad(is_loss, has_aux=True)

    (loss, aux), grads = jax.jit(step)(params, key, y)
    inputs = replicate((params, key, y), mesh)
    ((s_loss, s_aux), s_grads), hlo = run_compiled(
        lambda *a: step(*a, mesh=mesh), *inputs
    )

    # Without shard_plates, a step with replicated inputs and a replicated
    # scalar output gives the partitioner nothing to split.
    plain = jax.jit(
        step,
        in_shardings=NamedSharding(mesh, P()),
        out_shardings=NamedSharding(mesh, P()),
    )
    plain_hlo = plain.lower(*inputs).compile().as_text()

    def values(loss, aux, grads):
        return {
            "loss": float(loss),
            "log_Z": float(aux["log_Z"]),
            "ess": float(aux["ess"]),
            "log_weight": np.asarray(aux["log_weight"]).tolist(),
            "z": np.asarray(aux["z"]).tolist(),
            "grads": to_json(grads),
        }

    # diagnostics.summary is jitted: on sharded weights it runs sharded too.
    single_summary = coix.diagnostics.summary(aux["log_weight"]).to_dict()
    sharded_summary = coix.diagnostics.summary(s_aux["log_weight"]).to_dict()
    return {
        "single": {**values(loss, aux, grads), "summary": single_summary},
        "sharded": {**values(s_loss, s_aux, s_grads), "summary": sharded_summary},
        "info": {
            "z": describe(s_aux["z"]),
            "log_weight": describe(s_aux["log_weight"]),
            "single_z_devices": len(aux["z"].sharding.device_set),
            "collectives": collectives(hlo),
            "collectives_without_shard_plates": collectives(plain_hlo),
            # Each device draws the random bits of its own 16 particles, and
            # no array of all 64 particles exists anywhere in the program.
            "local_random_bits": "u32[16,3]" in hlo,
            "full_particle_arrays": bool(re.search(r"\[64[,\]]", hlo)),
        },
    }


def case_prng() -> dict:
    """Sharded == single under either threefry setting; the settings differ."""
    mesh = mesh_1d()
    params = {"loc": jnp.array([0.1, -0.2, 0.3]), "log_scale": jnp.zeros(DIM)}
    key, y = jax.random.key(1), jnp.asarray(Y_OBS)
    out = {}
    for flag in (True, False):
        with jax.threefry_partitionable(flag):
            single = jax.jit(lambda *a: is_loss(*a)[1]["z"])(params, key, y)
            sharded, hlo = run_compiled(
                lambda *a: is_loss(*a, mesh=mesh)[1]["z"],
                *replicate((params, key, y), mesh),
            )
        out[str(flag)] = {
            "single": np.asarray(single).tolist(),
            "sharded": np.asarray(sharded).tolist(),
            "collectives": collectives(hlo),
        }
    return out


# ---------------------------------------------------------------------------
# (2) resampling a sharded particle axis
# ---------------------------------------------------------------------------


def case_resampling() -> dict:
    mesh = mesh_1d()
    key_w, key_r = jax.random.split(jax.random.key(2))
    # Three columns (e.g. data points) of uneven weights.
    log_weights = 2.0 * jax.random.normal(key_w, (NUM_PARTICLES, 3))
    sharded_weights = jax.device_put(log_weights, NamedSharding(mesh, P("particles")))
    sharded_key = replicate(key_r, mesh)

    @jax.jit
    def all_schemes(key, log_weights):
        return {
            m: resample_indices(key, log_weights, NUM_PARTICLES, m) for m in SCHEMES
        }

    indices = {
        "single": all_schemes(key_r, log_weights),
        "sharded": all_schemes(sharded_key, sharded_weights),
    }
    indices = {
        run: {m: np.asarray(v).tolist() for m, v in result.items()}
        for run, result in indices.items()
    }

    params = {"loc": jnp.array([1.0, -1.0, 0.0]), "log_scale": jnp.full(DIM, 0.5)}
    y = jnp.asarray(Y_OBS)

    def run(params, key, y, mesh=None):
        result = {}
        for method in ("systematic", "multinomial"):
            program = coix.resample(is_program(params, mesh), method=method)
            _, trace, metrics = coix.traced_evaluate(program, seed=key)(y)
            result[method] = {
                "z": trace["z"].value,
                "log_Z": metrics["log_Z"],
                "log_weight": metrics["log_weight"],
            }
        return result

    single = jax.jit(run)(params, key_r, y)
    sharded, hlo = run_compiled(
        lambda *a: run(*a, mesh=mesh), *replicate((params, key_r, y), mesh)
    )
    programs = {
        "single": jax.tree_util.tree_map(lambda v: np.asarray(v).tolist(), single),
        "sharded": jax.tree_util.tree_map(lambda v: np.asarray(v).tolist(), sharded),
        "info": {
            "z": describe(sharded["systematic"]["z"]),
            "collectives": collectives(hlo),
        },
    }
    return {"indices": indices, "programs": programs}


# ---------------------------------------------------------------------------
# (3) SMC on a linear-Gaussian state-space model (programs/lgssm.py)
# ---------------------------------------------------------------------------


SMC_ESS_THRESHOLD = 0.2  # with this key, some steps resample and some do not


def case_smc() -> dict:
    mesh = mesh_1d()
    params = default_params(2)
    _, ys = simulate(jax.random.key(3), params, 8)

    def filter_program(mesh=None):
        def targets(t):
            if isinstance(t, int) and t == 0:
                program = lgssm.initial_target(params, ys, NUM_PARTICLES)
            else:
                program = lgssm.transition_target(params, ys, NUM_PARTICLES, t)
            return program if mesh is None else shard_plates(program, mesh, PARTICLES)

        def proposals(t):
            program = lgssm.bootstrap_proposal(params, ys, NUM_PARTICLES, t)
            return program if mesh is None else shard_plates(program, mesh, PARTICLES)

        return coix.algo.smc(
            targets,
            proposals,
            num_targets=ys.shape[0],
            ess_threshold=SMC_ESS_THRESHOLD,
            record=lgssm.filtering_mean,
        )

    def run(key, mesh=None):
        program = filter_program(mesh)
        _, trace, metrics = coix.traced_evaluate(program, seed=key)()
        history = metrics["history"]
        return {
            "log_Z": metrics["log_Z"],
            "ess": history.ess,
            "log_Z_increment": history.log_Z_increment,
            "resampled": history.resampled,
            "filtering_mean": history.records["filtering_mean"],
            "x": trace["x"].value,
        }

    key = jax.random.key(4)
    single = jax.jit(run)(key)
    sharded, hlo = run_compiled(lambda k: run(k, mesh), replicate(key, mesh))
    return {
        "single": {k: np.asarray(v).tolist() for k, v in single.items()},
        "sharded": {k: np.asarray(v).tolist() for k, v in sharded.items()},
        "info": {"x": describe(sharded["x"]), "collectives": collectives(hlo)},
    }


# ---------------------------------------------------------------------------
# (3b) tempered SMC with MCMC moves (fixed schedule, MALA), particles sharded
# ---------------------------------------------------------------------------


def tempered_model(mesh=None):
    """``z ~ N(0, I_3)``, ``y ~ N(z, 0.5^2 I)`` as a tempered SMC target."""

    def model():
        with numpyro.plate("particles", NUM_PARTICLES):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([DIM]).to_event(1))
            numpyro.sample("y", dist.Normal(z, 0.5).to_event(1), obs=Y_OBS)

    return model if mesh is None else shard_plates(model, mesh, PARTICLES)


def case_tempered() -> dict:
    mesh = mesh_1d()

    def run(key, mesh=None):
        program = coix.algo.tempered_smc(
            tempered_model(mesh),
            coix.mcmc.mala(),
            num_mcmc_steps=2,
            schedule=np.linspace(0.0, 1.0, 4),
        )
        _, trace, metrics = coix.traced_evaluate(program, seed=key)()
        return {
            "log_Z": metrics["log_Z"],
            "accept_rate": metrics["history"].records["accept_rate"][1:],
            "z": trace["z"].value,
        }

    key = jax.random.key(6)
    single = jax.jit(run)(key)
    sharded, hlo = run_compiled(lambda k: run(k, mesh), replicate(key, mesh))
    return {
        "single": {k: np.asarray(v).tolist() for k, v in single.items()},
        "sharded": {k: np.asarray(v).tolist() for k, v in sharded.items()},
        "info": {"z": describe(sharded["z"]), "collectives": collectives(hlo)},
    }


# ---------------------------------------------------------------------------
# (4) a 2-D mesh: IWAE VAE with particles x data (networks of vae_moons)
# ---------------------------------------------------------------------------

VAE_PARTICLES = 8  # K, 4 per device along "particles"
VAE_BATCH = 16  # B, 8 per device along "data"
VAE_AXES = {"particles": "particles", "data": "data"}


def vae_plates():
    return (
        numpyro.plate("particles", VAE_PARTICLES, dim=-2),
        numpyro.plate("data", VAE_BATCH, dim=-1),
    )


def vae_prior(x):
    particles, data = vae_plates()
    with particles, data:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    return z, x


def vae_likelihood(network, z, x):
    particles, data = vae_plates()
    with particles, data:
        numpyro.sample("x", dist.Normal(network.decoder(z), 1.0).to_event(1), obs=x)
    return (x,)


def vae_encoder(network, x):
    loc = network.encoder(x)  # (B, 2): one proposal per data point
    particles, data = vae_plates()
    with particles, data:
        z = numpyro.sample("z", dist.Normal(loc, 0.1).to_event(1))
    return (z,)


def vae_iwae(params, key, x, mesh=None):
    network = BindModule(vae_moons.VAE(), params)

    def shard(program):
        return program if mesh is None else shard_plates(program, mesh, VAE_AXES)

    target = coix.compose(
        shard(lambda z, x: vae_likelihood(network, z, x)),
        shard(vae_prior),
        suffix=False,
    )
    program = coix.propose(
        target, shard(lambda x: vae_encoder(network, x)), loss_fn=iwae_loss
    )
    _, trace, metrics = coix.traced_evaluate(program, seed=key)(x)
    return metrics["loss"], {
        "log_Z": metrics["log_Z"],
        "ess": metrics["ess"],
        "z": trace["z"].value,
    }


def case_vae_2d() -> dict:
    mesh = mesh_2d()
    x, _ = vae_moons.load_data(0, num_train=VAE_BATCH, num_test=1)
    params = vae_moons.VAE().init(jax.random.key(5), x[:1])
    key = jax.random.key(6)
    step = jax.value_and_grad(vae_iwae, has_aux=True)

    (loss, aux), grads = jax.jit(step)(params, key, x)
    inputs = (
        replicate(params, mesh),
        replicate(key, mesh),
        jax.device_put(x, NamedSharding(mesh, P("data"))),
    )
    ((s_loss, s_aux), s_grads), hlo = run_compiled(
        lambda *a: step(*a, mesh=mesh), *inputs
    )

    def values(loss, aux, grads):
        return {
            "loss": float(loss),
            "log_Z": float(aux["log_Z"]),
            "ess": float(aux["ess"]),
            "z": np.asarray(aux["z"]).tolist(),
            "grads": to_json(grads),
        }

    return {
        "single": values(loss, aux, grads),
        "sharded": values(s_loss, s_aux, s_grads),
        "info": {"z": describe(s_aux["z"]), "collectives": collectives(hlo)},
    }


def case_vae_moons_data_parallel() -> dict:
    """programs/vae_moons.py as it is; only its batch is placed on devices.

    Its particle plate is the data batch, so placing the data (over both
    axes of the 2-D mesh) shards the whole program without shard_plates.
    """
    mesh = mesh_2d()
    x, _ = vae_moons.load_data(0, num_train=64, num_test=1)
    params = vae_moons.VAE().init(jax.random.key(7), x[:1])
    key = jax.random.key(8)

    def loss(params, key, x):
        metrics = vae_moons.program_metrics(params, key, x)
        return metrics["loss"], (metrics["log_Z"], metrics["log_weight"])

    step = jax.value_and_grad(loss, has_aux=True)
    (single_loss, (single_log_z, _)), single_grads = jax.jit(step)(params, key, x)
    inputs = (
        replicate(params, mesh),
        replicate(key, mesh),
        jax.device_put(x, NamedSharding(mesh, P(("particles", "data")))),
    )
    ((s_loss, (s_log_z, s_log_weight)), s_grads), hlo = run_compiled(step, *inputs)
    return {
        "single": {
            "loss": float(single_loss),
            "log_Z": float(single_log_z),
            "grads": to_json(single_grads),
        },
        "sharded": {
            "loss": float(s_loss),
            "log_Z": float(s_log_z),
            "grads": to_json(s_grads),
        },
        "info": {
            "log_weight": describe(s_log_weight),
            "collectives": collectives(hlo),
        },
    }


# ---------------------------------------------------------------------------
# Errors that need several devices
# ---------------------------------------------------------------------------


def case_errors() -> dict:
    mesh = mesh_1d()

    def odd(y):
        with numpyro.plate("particles", 6):  # 6 is not a multiple of 4
            numpyro.sample("z", dist.Normal(0.0, 1.0))
        return ()

    try:
        coix.traced_evaluate(
            shard_plates(odd, mesh, PARTICLES), seed=jax.random.key(0)
        )(0.0)
        uneven = None
    except ValueError as error:
        uneven = str(error)
    return {"uneven": uneven}


CASES = {
    "importance": case_importance,
    "prng": case_prng,
    "resampling": case_resampling,
    "smc": case_smc,
    "tempered": case_tempered,
    "vae_2d": case_vae_2d,
    "vae_moons_data_parallel": case_vae_moons_data_parallel,
    "errors": case_errors,
}


def main() -> None:
    if jax.device_count() < NUM_DEVICES:
        sys.exit(
            f"sharding_cases.py needs {NUM_DEVICES} devices, found "
            f"{jax.device_count()}; run it with XLA_FLAGS="
            f"--xla_force_host_platform_device_count={NUM_DEVICES} JAX_PLATFORMS=cpu."
        )
    names = sys.argv[1:] or list(CASES)
    results = {
        "jax_version": jax.__version__,
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    }
    results.update({name: CASES[name]() for name in names})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
