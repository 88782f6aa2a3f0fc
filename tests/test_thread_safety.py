"""State kept across calls, used from several threads at once: lk.plan's observers, the native
backend's cache of low-rank forms, the cost model's decisions, the backend choice and its warning,
the non-finite check's hook. Real threads, started together at a barrier, many rounds."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

import lrtensor_kernels as lk
from fused import fused_kernels
from oracle import randomize_adapter, rel_err

ROUNDS = 30


def run_together(*targets, rounds=ROUNDS):
    """Runs every target ``rounds`` times in its own thread, all starting each round together;
    returns what they raised, as text."""
    barrier, failures = threading.Barrier(len(targets)), []

    backend = lk.get_backend()  # a thread's own choice: the new threads take this one's

    def loop(target):
        try:
            lk.set_backend(backend)
            for i in range(rounds):
                barrier.wait(timeout=60)
                target(i)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            failures.append(f"{type(err).__name__}: {err}")
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    lk.inject(net, "flora", ranks=2)
    for i, (_, layer) in enumerate(lk.adapter_layers(net)):
        randomize_adapter(layer, seed + i)
    return net


@pytest.mark.parametrize("other", ["another-model", "the-same-model"])
def test_plan_sees_its_own_thread_only(other, reference_backend):
    """While one thread plans a model, another trains a model (another one, or the same one under
    no_grad): the plan lists exactly its own forward's layers, and the training thread is undisturbed."""
    planned = model(0)
    trained = model(1) if other == "another-model" else planned
    x = torch.randn(2, 3, 6, 6)
    expected = [(r.name, r.strategy) for r in lk.plan(planned, x)]
    ref = trained(x).detach()

    def plan(i):
        got = [(r.name, r.strategy) for r in lk.plan(planned, x)]
        assert got == expected, got

    def train(i):
        for _ in range(3):
            if other == "another-model":
                trained.zero_grad()
                y = trained(x)
                y.square().sum().backward()
            else:
                with torch.no_grad():
                    y = trained(x)
            assert torch.equal(y.detach(), ref)

    assert run_together(plan, train, plan) == []


def test_native_form_cache_under_threads():
    """Threads run forward and backward of their own layers on the native backend (more layers than
    the form cache holds) and update their adapters in place between rounds: every result equals
    the reference backend's for the same tensors, so no thread ever got another's or a stale form."""
    fused_kernels("native")
    threads = 4
    layers = [[randomize_adapter(lk.LieRAConv2d(4, 6, 3, padding=1, rank=2), 10 * t + i) for i in range(3)]
              for t in range(threads)]
    x = torch.randn(2, 4, 5, 5)

    def work(t):
        def step(i):
            for layer in layers[t]:
                with torch.no_grad():
                    layer.lora_B.add_(0.01 * (i + 1))  # a new version: a cached form must not be reused
                results = {}
                for backend in ("native", "reference"):
                    layer.zero_grad()
                    with lk.use_backend(backend):
                        y = layer(x)
                        y.square().sum().backward()
                    results[backend] = (y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
                for got, ref in zip(results["native"], results["reference"]):
                    assert rel_err(got, ref) < 1e-5
        return step

    assert run_together(*(work(t) for t in range(threads)), rounds=10) == []


def test_backends_are_chosen_per_thread_and_warn_once(monkeypatch):
    """set_backend holds for its own thread; the auto backend's warning (native unavailable) comes
    once however many threads resolve at once."""
    from lrtensor_kernels import backend

    seen = {}

    def chooser(name):
        def step(i):
            lk.set_backend(name)
            for _ in range(20):
                assert lk.get_backend() == name
            seen[name] = True
        return step

    assert run_together(*(chooser(n) for n in ("reference", "native", "triton", "auto"))) == []
    assert lk.get_backend() == "auto"  # this thread's, untouched (the autouse fixture set it)

    monkeypatch.setattr(backend, "native_available", lambda: False)
    monkeypatch.setattr(backend, "_warned_native", False)
    from lrtensor_kernels.kernels import native_build

    monkeypatch.setattr(native_build, "unavailable_reason", lambda: "planted")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_together(*[lambda i: backend.resolve(torch.device("cpu"))] * 8, rounds=5) == []
    assert [str(w.message) for w in caught if "planted" in str(w.message)] != []
    assert len([w for w in caught if "planted" in str(w.message)]) == 1


def test_the_nonfinite_check_switched_from_many_threads_leaves_one_hook_or_none():
    hooks = torch.nn.modules.module._global_forward_hooks
    before = len(hooks)

    def toggle(i):
        lk.set_detect_nonfinite(i % 2 == 0)

    assert run_together(*[toggle] * 8, rounds=40) == []
    lk.set_detect_nonfinite(True)
    assert len(hooks) == before + 1
    lk.set_detect_nonfinite(False)
    assert len(hooks) == before and not lk.is_detect_nonfinite_enabled()


def test_cost_model_decisions_under_threads(reference_backend):
    """The memoised decisions of "auto", asked for from many threads at once with shapes that
    differ per thread, are those one thread gets alone."""
    from lrtensor_kernels.strategies import cost

    cost._decision_cached.cache_clear()
    nets = [model(0) for _ in range(4)]
    inputs = [torch.randn(1 + t, 3, 4 + 2 * t, 4 + 2 * t) for t in range(4)]
    expected = [[(r.name, r.strategy, r.relative_cost) for r in lk.plan(n, x)] for n, x in zip(nets, inputs)]
    cost._decision_cached.cache_clear()

    def ask(t):
        return lambda i: [(r.name, r.strategy, r.relative_cost) for r in lk.plan(nets[t], inputs[t])] == expected[t] \
            or pytest.fail(f"thread {t}: other decisions")

    assert run_together(*(ask(t) for t in range(4))) == []
