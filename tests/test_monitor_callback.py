"""The Ray Train controller's callback: one line for a worker's error, and the failure record it appends to the
run's metrics.jsonl (the driver's console shows it). Ray itself calls it in tests/test_exact_resume.py."""

import pytest

from distpose.metrics_log import read_records
from distpose.monitor.callback import ERROR_CHARS, RunMetricsCallback, error_line

WRAPPED = """ray::RayTrainWorker.run_train_fn() (pid=123, ip=10.0.0.1, actor_id=abc)
  File "/x/worker.py", line 10, in train_worker
    engine.step()
  File "pyarrow/error.pxi", line 92, in pyarrow.lib.check_status
OSError: When getting information for key 'runs/r/x' in bucket 'b': AWS Error NETWORK_CONNECTION: Timeout was reached
"""


@pytest.mark.parametrize(("text", "line"), [
    (WRAPPED, "OSError: When getting information for key 'runs/r/x' in bucket 'b': AWS Error NETWORK_CONNECTION: "
              "Timeout was reached"),
    ("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker",
     "RuntimeError: The actor died unexpectedly before finishing this task."),
    ("", "RuntimeError"),
])
def test_a_workers_error_in_one_line(text, line):
    assert error_line(RuntimeError(text)) == line


def test_a_long_error_is_cut():
    assert len(error_line(ValueError("ValueError: " + "x" * 1000))) == ERROR_CHARS


def test_each_failure_is_appended_to_the_record_with_its_count_and_lowest_rank_first(tmp_path):
    callback = RunMetricsCallback(False, "r", "backbone", str(tmp_path / "metrics.jsonl"))
    callback.after_exception(None, {1: ValueError("bad value"), 0: OSError("OSError: gone")})
    callback.after_exception(None, {})
    failures = read_records(tmp_path, "failure")
    assert [(f["failure"], f["ranks"], f["error"]) for f in failures] == [
        (1, [0, 1], "OSError: gone"), (2, [], "the worker group failed")]


def test_a_record_out_of_reach_is_a_warning_not_a_second_failure(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")
    callback = RunMetricsCallback(False, "r", "backbone", str(blocked / "metrics.jsonl"))
    callback.after_exception(None, {0: OSError("OSError: gone")})
    assert "could not record failure 1" in caplog.text
