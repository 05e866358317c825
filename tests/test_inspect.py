"""Trace tables: exact rows, and the weight column reproduces propose's weight.

Model: z ~ N(0, 1), y | z ~ N(z, 0.5^2) observed, in a particle plate of N.
``inspect_propose`` must mark y observed, z as scored by the target
(``+log p``) and by the proposal (``-log q``), a latent drawn by the target
alone as not in the weight, and an ``extend`` kernel's site as auxiliary
with the ``reverse`` loss role. The weight column is checked against the
maths: ``log w = w_in + sum(+log p rows) - sum(-log q rows)`` equals the
library's ``metrics.log_weight``.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import combinators as coix
from combinators import inspect as ci
from combinators import loss, weights
from combinators.inspect import SiteRow

N = 5
KEY = jax.random.key(0)
P = ("particles*",)


def target(with_w=False):
    def p():
        with numpyro.plate("particles", N):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            if with_w:
                numpyro.sample("w", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=1.0)
        return (z,)

    return p


def proposal():
    with numpyro.plate("particles", N):
        return (numpyro.sample("z", dist.Normal(0.2, 1.1)),)


def kernel(z):
    with numpyro.plate("particles", N):
        return (numpyro.sample("z", dist.Normal(0.9 * z, 0.4)),)


def reverse(z):
    with numpyro.plate("particles", N):
        numpyro.sample("z", dist.Normal(z, 0.5))
    return ()


def weight_from_rows(inspection):
    """log w_in + sum(+log p rows) - sum(-log q rows), in the weights' layout."""
    q_trace, p_trace = inspection.q_trace, inspection.p_trace
    layout = weights.layout_of(q_trace, p_trace)
    total = jnp.zeros(layout.shape)
    for row in inspection.rows:
        trace = q_trace if row.program == "q" else p_trace
        site = trace.history(row.name)[row.generation]
        sign = {"+log p": 1.0, "-log q": -1.0, "no": 0.0}[row.weight]
        total = total + sign * weights.site_log_weight(site, layout)
    return total


def test_propose_rows_mark_observed_weight_and_drawn_by_target():
    inspection = ci.inspect_propose(target(with_w=True), proposal, seed=KEY)
    normal = "Normal"
    assert inspection.rows == [
        SiteRow("z", 0, (N,), P, normal, "latent", False, "q", "-log q", "forward"),
        SiteRow("z", 0, (N,), P, normal, "latent", False, "p", "+log p", "target"),
        SiteRow("w", 0, (N,), P, normal, "latent", False, "p", "no", "target"),
        SiteRow("y", 0, (), (), normal, "observed", False, "p", "+log p", "target"),
    ]
    # The weight column is the weight: q has no observed site, so w_in = 0.
    np.testing.assert_allclose(
        weight_from_rows(inspection),
        inspection.metrics.log_weight,
        rtol=1e-5,
        atol=1e-5,
    )


def test_extend_marks_auxiliary_site_reverse_and_roles_follow_loss():
    q = coix.compose(kernel, proposal)
    inspection = ci.inspect_propose(
        coix.extend(target(), reverse), q, seed=KEY, loss_fn=loss.rws_loss
    )
    normal = "Normal"
    assert inspection.rows == [
        SiteRow("z", 0, (N,), P, normal, "latent", False, "q", "-log q", "forward"),
        SiteRow("z", 1, (N,), P, normal, "latent", False, "q", "-log q", "proposal"),
        SiteRow("z", 0, (N,), P, normal, "latent", False, "p", "+log p", "target"),
        SiteRow("z", 1, (N,), P, normal, "latent", True, "p", "+log p", "reverse"),
        SiteRow("y", 0, (), (), normal, "observed", False, "p", "+log p", "target"),
    ]
    np.testing.assert_allclose(
        weight_from_rows(inspection),
        inspection.metrics.log_weight,
        rtol=1e-5,
        atol=1e-5,
    )
    # The loss is the one given (the recording wrapper keeps its value).
    _, _, metrics = coix.traced_evaluate(
        coix.propose(coix.extend(target(), reverse), q, loss_fn=loss.rws_loss), seed=KEY
    )()
    np.testing.assert_allclose(inspection.metrics.loss, metrics.loss, rtol=1e-6)
    text = str(inspection)
    assert "aux" in text and "reverse" in text and "+log p" in text
    assert "<table>" in inspection._repr_html_()


def test_detach_keeps_roles_of_the_first_target_evaluation():
    """propose(detach=True) scores p twice; the second run must not relabel."""
    inspection = ci.inspect_propose(
        target(with_w=True), proposal, seed=KEY, loss_fn=loss.rws_loss, detach=True
    )
    assert [(r.program, r.name, r.weight) for r in inspection.rows] == [
        ("q", "z", "-log q"),
        ("p", "z", "+log p"),
        ("p", "w", "no"),
        ("p", "y", "+log p"),
    ]


def plated_model(y):
    """Particles at dim -2, a data plate at -1, a 2-D event."""
    with numpyro.plate("particles", N, dim=-2):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("v", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
        with numpyro.plate("data", 4, dim=-1):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    return (mu,)


Y = jnp.arange(4.0)

EXPECTED_TABLE = """\
Trace with 3 sites
  site  gen  shape      axes                  distribution  kind
  ----  ---  ---------  --------------------  ------------  --------
  mu    0    (5, 1)     particles*, -         Normal        latent
  v     0    (5, 1, 2)  particles*, -, event  Normal        latent
  y     0    (4,)       data                  Normal        observed
* particle axis: plate 'particles' (N=5); gen 0 is the newest value of a name"""


def test_print_trace_prints_exact_table_and_returns_traced_evaluate_results():
    buffer = io.StringIO()
    out, trace, metrics = ci.print_trace(plated_model, Y, seed=KEY, file=buffer)
    printed = buffer.getvalue()
    assert printed.startswith(EXPECTED_TABLE + "\nmetrics: log_weight (5, 1), ESS ")
    assert "of 5" in printed and "resampled no" in printed
    expected = coix.traced_evaluate(plated_model, seed=KEY)(Y)
    np.testing.assert_array_equal(out[0], expected[0][0])
    np.testing.assert_array_equal(trace["v"].value, expected[1]["v"].value)
    np.testing.assert_array_equal(metrics.log_weight, expected[2].log_weight)


def test_repr_is_the_table_and_generations_are_rows():
    program = coix.compose(kernel, coix.resample(coix.propose(target(), proposal)))
    _, trace, metrics = coix.traced_evaluate(program, seed=KEY)()
    assert repr(trace) == ci.describe(trace)
    assert ci.site_rows(trace) == [
        SiteRow("z", 0, (N,), P, None, "latent", False),
        SiteRow("z", 1, (N,), P, None, "latent", False),
        SiteRow("y", 0, (), (), None, "observed", False),
    ]
    # Replayed sites (a combinator's output) have no known distribution, so
    # the column is left out of the table.
    assert "distribution" not in repr(trace)
    assert "particles*" in repr(trace) and "resampled yes" in ci.describe(
        trace, metrics
    )
    html = trace._repr_html_()
    assert html.startswith("<table>") and "<td>observed</td>" in html


def test_html_escapes_names():
    trace = coix.Trace.from_sites({"<b>": coix.Site(jnp.zeros(2), jnp.zeros(2))})
    html = ci.describe_html(trace)
    assert "&lt;b&gt;" in html and "<b>" not in html


def test_jit_traces_describe_like_eager_ones_and_tracers_error_clearly():
    def run(key):
        return coix.traced_evaluate(coix.propose(target(), proposal), seed=key)()

    _, eager_trace, eager_metrics = run(KEY)
    _, jit_trace, jit_metrics = jax.jit(run)(KEY)
    assert ci.describe(jit_trace) == ci.describe(eager_trace)
    assert "ESS" in ci.describe(jit_trace, jit_metrics)

    seen = {}

    @jax.jit
    def inside(key):
        _, trace, metrics = run(key)
        seen["table"] = repr(trace)  # only shapes: fine on tracers
        with pytest.raises(ValueError, match="abstract value"):
            ci.describe(trace, metrics)
        return metrics.log_Z

    inside(KEY)
    assert seen["table"] == repr(eager_trace)


def test_scan_history_is_summarised():
    def step(t, q):
        return coix.propose(coix.extend(target(), reverse), coix.compose(kernel, q))

    program = coix.scan(0, 3, step, coix.propose(target(), proposal))
    _, trace, metrics = coix.traced_evaluate(program, seed=KEY)()
    text = ci.describe(trace, metrics)
    assert "history: 4 entries (initial program + steps), resampled at 0 steps" in text
