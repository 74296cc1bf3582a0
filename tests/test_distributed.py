"""Data-parallel fit on torch.distributed (gloo, CPU): N ranks with B/N episodes each take the
step one process takes with B, and a checkpoint of N ranks resumes in any number of them."""

from __future__ import annotations

import math
import subprocess
import sys

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_worldmodel.evaluate import CategoricalHMM
from pyro_worldmodel.infer import TraceEnum_ELBO, default_optim, fit
from pyro_worldmodel.infer.training import DataParallel
from pyro_worldmodel.io import read_checkpoint
from pyro_worldmodel.model.guides import CategoricalFilterGuide
from pyro_worldmodel.workflow import load_run

B, STEPS = 8, 20


def problem():
    """An exact objective (the HMM's enumerated log-likelihood), so that the ranks' steps
    equal one process's to float tolerance: no random draw differs between them."""
    torch.set_default_dtype(torch.float64)
    hmm = CategoricalHMM.random(3, 2, 1, seed=0, spread=2.0)
    obs, actions, _ = hmm.sample(16, 10, seed=1)
    mask = torch.arange(10) < torch.tensor([10, 9, 8, 7, 6, 5, 10, 10] * 2)[:, None]  # unequal lengths
    model = CategoricalHMM.random(3, 2, 1, seed=5).world_model()
    pyro.set_rng_seed(0)
    guide = CategoricalFilterGuide.for_model(model, rnn_dim=4, hidden=(4,)).double()
    return model, guide, (obs, actions, mask)


def train(steps, checkpoint=None, resume=False, progress=False, batch_size=B):
    model, guide, data = problem()
    history = fit(
        model, guide, *data, num_steps=steps, batch_size=batch_size, elbo=TraceEnum_ELBO(),
        optim=default_optim(0.05), seed=0, checkpoint=checkpoint, checkpoint_every=5,
        resume=resume, progress=progress,
    )  # fmt: skip
    return {k: v.clone() for k, v in model.state_dict().items()}, history.loss


def train_gaussian(steps):
    """The default model and ELBO, whose draws differ from rank to rank."""
    from pyro_worldmodel import ActionSpace, Spec, build

    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    obs, actions = torch.randn(16, 12, 3, generator=g), torch.randn(16, 12, 1, generator=g)
    pyro.set_rng_seed(0)
    b = build(Spec.preset("smoke"), 3, ActionSpace.box(1))
    history = fit(b.model, b.guide, obs, actions, num_steps=steps, batch_size=B, seed=0, progress=False)
    state = {**b.model.state_dict(), **{f"guide.{k}": v for k, v in b.guide.state_dict().items()}}
    return {k: v.clone() for k, v in state.items()}, history.loss


def _worker(rank, world, init_file, out, jobs):
    """Each job in one process group: ``(name, kind, keywords)``, kind "exact" or "gaussian";
    the result (or the ValueError's message) saved per job and rank."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, kind, kw in jobs:
            try:
                state, losses = train_gaussian(**kw) if kind == "gaussian" else train(**kw)
                results[name] = {"state": state, "losses": losses}
            except ValueError as e:
                results[name] = {"error": str(e)}
        torch.save(results, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, world, jobs):
    """``jobs`` run by ``world`` ranks, one spawn for all: ``[{job: result} for each rank]``."""
    out = tmp_path / "ranks"
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "init"), str(out), jobs), nprocs=world, start_method="spawn"
    )
    return [torch.load(f"{out}.rank{r}") for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every job of the 2-rank tests, in one spawn of 2 ranks (each spawn costs seconds)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    checkpoint = str(tmp / "run.ckpt")
    jobs = [
        ("exact", "exact", {"steps": 10, "checkpoint": checkpoint}),
        ("gaussian", "gaussian", {"steps": 10}),
        ("small", "exact", {"steps": 2, "batch_size": 1}),
    ]
    ranks = run_ranks(tmp, 2, jobs)
    return ranks, checkpoint


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-10, msg=k)


@pytest.mark.slow
def test_two_ranks_with_half_the_batch_each_take_one_processs_steps_and_resume_in_one(two_ranks):
    ranks, checkpoint = two_ranks
    one_state, one_losses = train(10)
    for r in ranks:  # every rank holds the same parameters, those of one process
        assert_same_state(r["exact"]["state"], one_state)
        assert r["exact"]["losses"] == pytest.approx(one_losses, rel=1e-10)
    assert one_losses[-1] < one_losses[0]  # it trained
    # the 2 ranks' checkpoint, resumed by one process, ends where one process ends
    resumed_state, resumed_losses = train(STEPS, checkpoint=checkpoint, resume=True)
    one_state, one_losses = train(STEPS)
    assert_same_state(resumed_state, one_state)
    assert resumed_losses == pytest.approx(one_losses, rel=1e-10)


@pytest.mark.slow
def test_with_a_stochastic_elbo_every_rank_takes_the_same_update(two_ranks):
    """The ranks draw different noise, but the summed gradient, so the update, is one."""
    first, second = (r["gaussian"] for r in two_ranks[0])
    assert_same_state(first["state"], second["state"])
    assert first["losses"] == second["losses"] and all(math.isfinite(x) for x in first["losses"])
    one_state, _ = train_gaussian(10)
    assert any(not torch.equal(first["state"][k], one_state[k]) for k in one_state)  # other draws


@pytest.mark.slow
def test_a_batch_smaller_than_the_ranks_is_refused_on_every_rank(two_ranks):
    for r in (r["small"] for r in two_ranks[0]):
        assert r["error"] == "batch_size: expected at least one episode per rank, 2 ranks, got 1"


def test_one_process_is_plain_fit_and_the_shards_partition_the_batch(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert DataParallel.of_process_group() is None  # a group of one: fit as usual
    finally:
        dist.destroy_process_group()
    assert DataParallel(1, 3).shard(torch.arange(8)).tolist() == [1, 4, 7]
    shards = [DataParallel(r, 3).shard(torch.arange(8)) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(8))  # together, the batch, once each


def torchrun(*args, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "pyro_worldmodel", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_torchrun_trains_one_run_with_two_ranks_and_a_refusal_reaches_every_rank(tmp_path):
    out = tmp_path / "run"
    args = (
        "train",
        "--preset",
        "smoke",
        "--episodes",
        "12",
        "--out",
        str(out),
        "--no-evaluate",
        "--seed",
        "0",
    )
    first = torchrun(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("trained 20 steps") == 1  # rank 0 alone reports, and writes
    run = load_run(out)
    assert len(read_checkpoint(out / "model.ckpt")["extra"]["history"]["loss"]) == 20
    before = (out / "model.ckpt").read_bytes()
    again = torchrun(*args, cwd=tmp_path)  # the run is there: refused, without --overwrite
    assert again.returncode != 0
    assert again.stderr.count("already holds a trained run") == 2  # rank 0's error, and the other's
    assert "rank 0 stopped before training" in again.stderr
    assert (out / "model.ckpt").read_bytes() == before and run.model is not None


def test_only_train_runs_data_parallel(monkeypatch, capsys):
    from pyro_worldmodel.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    assert main(["presets"]) == 2
    assert (
        "WORLD_SIZE: expected 1 for presets, which runs in one process; only train runs"
        in capsys.readouterr().err
    )
