"""The reference programs run end to end from the command line."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    return subprocess.run(
        [sys.executable, "-m", "programs", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_program():
    from programs import PROGRAMS

    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "vae_moons" in result.stdout
    for name, module in PROGRAMS.items():
        assert name in result.stdout
        assert module.DESCRIPTION in result.stdout


def test_unknown_program_exits_nonzero_with_message():
    result = run_cli("no_such_program", "--out", "unused")
    assert result.returncode != 0
    assert "unknown program 'no_such_program'" in result.stderr
    assert "vae_moons" in result.stderr


@pytest.mark.parametrize("option", ["--steps", "--particles"])
def test_nonpositive_options_are_rejected(option):
    result = run_cli("vae_moons", option, "0")
    assert result.returncode != 0
    assert option in result.stderr


def test_every_program_documents_its_options_and_the_help_shows_them():
    import inspect

    from programs import PROGRAMS
    from programs.__main__ import argument_docs, program_parser

    for name, module in PROGRAMS.items():
        docs = argument_docs(module.run)
        for option in inspect.signature(module.run).parameters:
            assert docs.get(option), f"{name}.run does not document {option!r}"
        text = " ".join(program_parser(name).format_help().split())
        for option in ("steps", "particles"):
            assert " ".join(docs[option].split()) in text, (name, option)
    lgssm_help = " ".join(program_parser("lgssm").format_help().split())
    assert "--steps STEPS the number of time steps T" in lgssm_help
    assert "max(particles, 20)" in program_parser("gmm_apg").format_help()


def test_program_specific_options_are_forwarded_with_types_and_choices():
    from programs.__main__ import parse

    _, options = parse(["sbn", "--estimator", "rws", "--fast-compile"])
    assert options["estimator"] == "rws" and options["fast_compile"] is True
    _, options = parse(["annealing", "--target", "funnel", "--steps", "7"])
    assert options["target"] == "funnel" and options["steps"] == 7
    _, options = parse(["lgssm", "--ess-threshold", "none", "--quiet"])
    assert options["ess_threshold"] is None and options["progress"] is False
    _, options = parse(["lgssm", "--ess-threshold", "0.3"])
    assert options["ess_threshold"] == 0.3
    for bad in (["sbn", "--estimator", "nope"], ["annealing", "--target", "box"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_smoke_sizes_replace_defaults_and_given_options_override_them():
    from programs import rws_gmm
    from programs.__main__ import parse

    _, options = parse(["rws_gmm", "--smoke", "--steps", "7"])
    assert options["steps"] == 7  # given
    assert options["num_seeds"] == rws_gmm.SMOKE_CONFIG["num_seeds"]  # smoke
    assert options["fast_compile"] is True
    _, options = parse(["rws_gmm"])
    assert options["steps"] == 12_000 and options["fast_compile"] is False
    with pytest.raises(SystemExit):
        parse(["vae_moons", "--smoke"])  # it has no SMOKE_CONFIG


def test_sequence_options_take_several_values():
    from programs.__main__ import parse

    _, options = parse(
        ["rws_gmm", "--estimators", "rws", "vimco", "--particle-counts", "2", "5"]
    )
    assert options["estimators"] == ("rws", "vimco")
    assert options["particle_counts"] == (2, 5)
    with pytest.raises(SystemExit):
        parse(["rws_gmm", "--particle-counts", "two"])


def test_every_package_entry_point_is_the_registry_cli():
    result = subprocess.run(
        [sys.executable, "-m", "programs.sbn", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m programs sbn" in result.stdout
    assert "--estimator" in result.stdout


def test_registry_modules_have_the_program_interface():
    import inspect

    from programs import PROGRAMS

    for name, module in PROGRAMS.items():
        assert isinstance(module.DESCRIPTION, str) and "\n" not in module.DESCRIPTION, (
            name
        )
        parameters = inspect.signature(module.run).parameters
        for option in ("steps", "particles", "seed", "out", "progress"):
            assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY, (
                name,
                option,
            )


def test_vae_moons_trains_and_writes_outputs(tmp_path):
    out = tmp_path / "out"
    result = run_cli("vae_moons", "--steps", "30", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final test ELBO:" in result.stdout
    assert "log Z over points:" in result.stdout
    # --quiet: no progress bar and no per-step log lines.
    assert "train:" not in result.stderr and "Step" not in result.stdout

    png = out / "vae_moons.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "vae_moons_metrics.json").read_text())
    assert record["steps"] == 30
    assert record["particles"] == 300
    assert record["seed"] == 0
    assert record["elapsed_seconds"] > 0
    metrics = record["metrics"]
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["test_elbo"] == pytest.approx(-metrics["test_loss"])
    # Training improves the objective on both the training minibatches and
    # the held-out test set (11.3 -> about 10.3 after 30 steps).
    assert metrics["last_train_loss"] < metrics["first_train_loss"] - 0.3
    assert metrics["test_loss"] < metrics["initial_test_loss"] - 0.3
    assert metrics["skipped_steps"] == 0
