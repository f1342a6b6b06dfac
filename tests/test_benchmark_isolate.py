"""The benchmark row worker: a task past its limit is killed and recorded, the next runs."""

import pytest

from benchmarks.isolate import RowFailed, RowTimeout, Worker


def test_worker_times_out_reports_errors_and_recovers():
    worker = Worker(timeout_s=2.0)
    try:
        assert worker("math:sqrt", 16.0) == 4.0
        first = worker._proc.pid
        with pytest.raises(RowTimeout, match="time:sleep ran past the row limit of 2 s"):
            worker("time:sleep", 60)
        assert worker._proc is None  # killed, not left running
        assert worker("math:sqrt", 9.0) == 3.0  # a fresh process takes the next task
        assert worker._proc.pid != first
        with pytest.raises(RowFailed, match="ValueError: math domain error"):
            worker("math:sqrt", -1.0)
        assert worker("math:hypot", 3.0, 4.0) == 5.0  # an error does not end the process
    finally:
        worker.close()
