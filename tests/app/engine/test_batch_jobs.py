"""BatchJobs: classification and embedding calls a token budget at a time, in order, per kind."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.engine.batch_jobs import BatchJobs, Job


class Recorder:
    """A run function that answers each prompt with its first id and length, and notes its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[list[int]]] = []
        self.fail = fail

    def __call__(self, prompts: list[list[int]]) -> np.ndarray:
        self.calls.append(prompts)
        if self.fail:
            raise ValueError("the graph failed")
        return np.array([[p[0], len(p)] for p in prompts], np.float32)


def collect(results: dict[str, Any], name: str):  # noqa: ANN201
    return lambda out: results.__setitem__(name, out)


def test_a_big_job_is_worked_through_a_budget_at_a_time_in_order() -> None:
    jobs, run, got = BatchJobs(max_tokens=10, max_rows=100), Recorder(), {}
    prompts = [[i] * 4 for i in range(7)]  # 28 tokens: 2 prompts (8 tokens) per call
    jobs.add(Job(prompts, collect(got, "a"), run, "embedding"))
    rounds = 0
    while jobs:
        jobs.run_some()
        rounds += 1
    assert rounds == 4 and [len(c) for c in run.calls] == [2, 2, 2, 1]
    np.testing.assert_array_equal(got["a"], [[i, 4] for i in range(7)])


def test_small_jobs_share_a_call_and_each_gets_its_own_rows() -> None:
    jobs, run, got = BatchJobs(max_tokens=100, max_rows=100), Recorder(), {}
    jobs.add(Job([[1], [2, 2]], collect(got, "a"), run, "embedding"))
    jobs.add(Job([[3, 3, 3]], collect(got, "b"), run, "embedding"))
    jobs.run_some()
    assert len(run.calls) == 1 and not jobs
    np.testing.assert_array_equal(got["a"], [[1, 1], [2, 2]])
    np.testing.assert_array_equal(got["b"], [[3, 3]])


def test_a_prompt_over_the_budget_runs_alone_and_the_row_limit_holds() -> None:
    jobs, run, got = BatchJobs(max_tokens=4, max_rows=2), Recorder(), {}
    jobs.add(Job([[1] * 9, [2], [3], [4]], collect(got, "a"), run, "embedding"))
    while jobs:
        jobs.run_some()
    assert [len(c) for c in run.calls] == [1, 2, 1]
    np.testing.assert_array_equal(got["a"][:, 0], [1, 2, 3, 4])


def test_kinds_run_in_separate_calls_and_a_failure_fails_only_its_kind() -> None:
    jobs, ok, bad, got = BatchJobs(max_tokens=100, max_rows=100), Recorder(), Recorder(fail=True), {}
    jobs.add(Job([[1]], collect(got, "cls"), bad, "classification"))
    jobs.add(Job([[2]], collect(got, "emb"), ok, "embedding"))
    jobs.run_some()
    assert isinstance(got["cls"], ValueError) and not jobs
    np.testing.assert_array_equal(got["emb"], [[2, 1]])


def test_a_job_failing_midway_is_answered_once_and_leaves_the_queue() -> None:
    jobs, got, calls = BatchJobs(max_tokens=2, max_rows=100), [], []

    def second_call_fails(prompts: list[list[int]]) -> np.ndarray:
        calls.append(prompts)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return np.zeros((len(prompts), 1), np.float32)

    jobs.add(Job([[1, 1]] * 4, got.append, second_call_fails, "embedding"))
    jobs.add(Job([[5, 5]], lambda out: got.append(("next", out)), second_call_fails, "embedding"))
    while jobs:
        jobs.run_some()
    assert isinstance(got[0], RuntimeError) and got[1][0] == "next" and len(got) == 2
    assert len(calls) == 3  # the failed job's last two prompts were never run


@pytest.mark.parametrize("taken", [0, 1])
def test_fail_all_answers_every_queued_job(taken: int) -> None:
    jobs, got = BatchJobs(max_tokens=1, max_rows=100), []
    jobs.add(Job([[1], [2]], got.append, Recorder(), "embedding"))
    for _ in range(taken):
        jobs.run_some()  # half of it done
    jobs.fail_all(RuntimeError("engine stopped"))
    assert len(got) == 1 and isinstance(got[0], RuntimeError) and not jobs
