"""PPO's regularizer worker: the overlapped regularizer gives exactly the sequential result, the
thread counts stay where the design puts them, and the regularizer's errors reach the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.test_regularizers_wpr import rollout, setup_reg, wpr_cfg
from wprctl.errors import UserError
from wprctl.manifest import RegularizerConfig
from wprctl.ot import compress_topk
from wprctl.ot.threads import compiled_threads, free_threads, single_thread
from wprctl.regularizers import RegBatch, Regularizer, build_regularizer
from wprctl.stages.ppo import _RegularizerWorker

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    """Two intra-op threads on the main thread (whatever the machine), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _logprobs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def _large_rollout():
    """A batch large enough (1017 positions x 3000 tokens, a batch support of ~3000 tokens) that
    the two-thread side splits compress_topk's and the solver's ops across threads."""
    g = torch.Generator().manual_seed(5)
    V, B, T = 3000, 8, 128
    ref = 3.0 * torch.randn(B, T, V, generator=g)
    pol = ref + torch.randn(B, T, V, generator=g)
    actions = torch.randint(2, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, -7:] = 0
    return pol, ref, actions, mask, torch.randn(V, 16, generator=g)


def _large_reg(emb: torch.Tensor) -> Regularizer:
    cfg = RegularizerConfig.model_validate(
        {"kind": "wpr", "wpr": {"method": "paper", "k1": 16, "k2": 64, "epsilon": 0.25}}
    )
    reg = build_regularizer(cfg)
    reg.setup(ref_embeddings=emb, cache_dir=None, pad_id=0, eos_id=1)
    return reg


CASES = {
    "wpr-paper": lambda: (setup_reg(wpr_cfg(method="paper", max_iter=10)), *rollout(seed=3)),
    "wpr-wellposed": lambda: (
        setup_reg(wpr_cfg(method="wellposed", gauge="centered")),
        *rollout(3),
    ),
    "kl": lambda: (build_regularizer(RegularizerConfig(kind="kl")), *rollout(seed=3)),
    "wpr-paper-large": lambda: (lambda p, r, a, m, e: (_large_reg(e), p, r, a, m))(
        *_large_rollout()
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_overlapped_regularizer_is_bit_identical_to_sequential(case: str, two_threads) -> None:
    # What `PPORecipe.experience` did before the overlap, on this (two-thread) thread ...
    reg, pol, ref, actions, mask = CASES[case]()
    lp, lq = _logprobs(pol, actions), _logprobs(ref, actions)
    topk = compress_topk(pol, ref, actions, reg.topk, mask=mask.bool()) if reg.topk else None
    batch = RegBatch(actions, mask, lp, lq, topk)
    want_penalty, want_div, want_metrics = (
        reg.reward_penalty(batch), reg.divergence(batch), reg.metrics()
    )  # fmt: skip
    assert want_penalty is not None and float(want_penalty.abs().sum()) > 0

    # ... and through the worker while this thread keeps computing (multi-threaded ops).
    worker = _RegularizerWorker(CASES[case]()[0], CPU)
    try:
        logits = [pol.clone(), ref.clone()]
        job = worker.submit(logits, RegBatch(actions, mask, lp, lq))
        x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
        for _ in range(20):
            x = torch.tanh(x @ x.T / 512)
        out = job.result(timeout=300)
        assert logits == []  # the worker let go of the (B, T, V) logits
    finally:
        worker.close()
    assert out.penalty.shape == mask.shape
    assert torch.equal(out.penalty, want_penalty)
    assert torch.equal(out.divergence, want_div)
    assert worker.reg.metrics() == want_metrics
    assert out.seconds > 0


class _Probe(Regularizer):
    """Records the intra-op thread counts seen while it runs, on its thread and the caller's."""

    def __init__(self) -> None:
        super().__init__(RegularizerConfig(kind="none"))
        self.inside, self.release = threading.Event(), threading.Event()
        self.seen: dict[str, int] = {}

    def reward_penalty(self, batch: RegBatch) -> torch.Tensor:
        self.seen["worker"] = torch.get_num_threads()
        self.seen["worker_compiled"] = compiled_threads()
        with single_thread():
            self.inside.set()
            self.release.wait(60)
        return torch.zeros_like(batch.mask)


def _submit(worker: _RegularizerWorker, B: int = 2, T: int = 3):
    mask = torch.ones(B, T)
    logits = [torch.zeros(B, T, 5), torch.zeros(B, T, 5)]
    return worker.submit(logits, RegBatch(torch.zeros(B, T, dtype=torch.long), mask, mask, mask))


def test_worker_runs_one_thread_and_leaves_the_main_threads_count(two_threads) -> None:
    probe = _Probe()
    worker = _RegularizerWorker(probe, CPU)
    try:
        # a thread started later begins with the main thread's count, not the worker's
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        job = _submit(worker)
        assert probe.inside.wait(60)
        main_during = torch.get_num_threads()
        probe.release.set()
        job.result(timeout=60)
    finally:
        probe.release.set()
        worker.close()
    # one intra-op thread on the worker; its compiled solvers keep the main thread's two
    assert probe.seen == {"worker": 1, "worker_compiled": 2}
    assert main_during == 2 and later == [2] and torch.get_num_threads() == 2
    assert compiled_threads() == 2


class _CoreProbe(Regularizer):
    """Records the threads a compiled launch on the worker would take, at two moments the test
    chooses."""

    def __init__(self) -> None:
        super().__init__(RegularizerConfig(kind="none"))
        self.steps = [threading.Event() for _ in range(4)]
        self.free: list[int] = []

    def reward_penalty(self, batch: RegBatch) -> torch.Tensor:
        for k in (0, 2):
            self.free.append(free_threads(2))
            self.steps[k].set()
            self.steps[k + 1].wait(60)
        return torch.zeros_like(batch.mask)


def test_worker_launches_take_one_core_while_the_main_thread_shares_them(two_threads) -> None:
    """Inside ``sharing_cores`` the main thread runs on one intra-op thread fewer and a short
    compiled launch on the worker takes the one core left; after it, every core again."""
    probe = _CoreProbe()
    worker = _RegularizerWorker(probe, CPU)
    try:
        with worker.sharing_cores():
            job = _submit(worker)
            assert probe.steps[0].wait(60)
            main_during = torch.get_num_threads()
        probe.steps[1].set()
        assert probe.steps[2].wait(60)
        probe.steps[3].set()
        job.result(timeout=60)
        with worker.sharing_cores(enabled=False):  # (kl, fdiv: nothing to share)
            assert torch.get_num_threads() == 2
    finally:
        for e in probe.steps:
            e.set()
        worker.close()
    assert main_during == 1 and torch.get_num_threads() == 2
    assert probe.free == [1, 2]


def test_single_thread_on_another_thread_keeps_the_main_threads_count(two_threads) -> None:
    """The solvers' `single_thread` calls `torch.set_num_threads`; with PyTorch's OpenMP backend
    that sets the calling thread's count only. Were it process-wide, a regularizer on a worker with
    several threads would make the main thread's concurrent forward passes single-threaded."""
    seen: dict[str, int] = {}
    inside, release = threading.Event(), threading.Event()

    def solve_like() -> None:
        torch.set_num_threads(2)
        with single_thread():
            seen["other_inside"] = torch.get_num_threads()
            inside.set()
            release.wait(60)
        seen["other_after"] = torch.get_num_threads()

    t = threading.Thread(target=solve_like)
    t.start()
    try:
        assert inside.wait(60)
        seen["main_during"] = torch.get_num_threads()
    finally:
        release.set()
        t.join(60)
    assert seen == {"other_inside": 1, "main_during": 2, "other_after": 2}


def test_regularizer_errors_reach_the_caller_unchanged() -> None:
    error = UserError("WPR: bad input")

    class Failing(Regularizer):
        def reward_penalty(self, batch: RegBatch) -> torch.Tensor:
            raise error

    worker = _RegularizerWorker(Failing(RegularizerConfig(kind="none")), CPU)
    try:
        with pytest.raises(UserError) as caught:
            _submit(worker).result(timeout=60)
    finally:
        worker.close()
    assert caught.value is error and caught.value.exit_code == 2
