"""metrics.jsonl, written by MetricsLog and read by one reader: a line still being written is left for later, a
torn record of a killed attempt costs no other record, and a redone step counts once in a run's history."""

import json

from distpose.metrics_log import METRICS_LOG, MetricsLog, parse_records, read_records, run_history


def line(record: dict) -> bytes:
    return (json.dumps(record) + "\n").encode()


def test_a_line_being_written_is_left_for_the_next_read():
    data = line({"kind": "start", "time": 1.0}) + line({"kind": "step", "step": 1, "time": 2.0}) + b'{"kind": "st'
    assert [r["kind"] for r in parse_records(data)] == ["start", "step"]
    assert parse_records(data, "step") == [{"kind": "step", "step": 1, "time": 2.0}]
    assert parse_records(b"") == [] and parse_records(b'{"kind"') == []


def test_a_run_without_a_record_yet_has_none(tmp_path):
    assert read_records(tmp_path / "no-run") == [] and run_history(tmp_path / "no-run") == ([], [])


def test_an_attempt_after_a_torn_record_keeps_its_own(tmp_path):
    """Rank 0 killed mid-line leaves a record without its newline; the next attempt's first record must not be
    glued to it (the pair would be one unreadable line, and the restart lost from the record)."""
    path = tmp_path / METRICS_LOG
    path.write_bytes(line({"kind": "step", "step": 1, "time": 1.0}) + b'{"kind": "step", "step": 2, "ti')
    log = MetricsLog(path, enabled=True)
    log.write("start", resumed_from="checkpoint_step00000001")
    log.write("step", step=2, loss=0.5)
    records = read_records(tmp_path)
    assert [(r["kind"], r.get("step")) for r in records] == [("step", 1), ("start", None), ("step", 2)]


def test_a_disabled_log_writes_nothing(tmp_path):
    MetricsLog(tmp_path / METRICS_LOG, enabled=False).write("start")
    assert not (tmp_path / METRICS_LOG).exists()


def test_history_keeps_the_last_attempts_record_of_a_redone_step(tmp_path):
    records = [{"kind": "start"}, {"kind": "step", "step": 1, "loss": 1.0}, {"kind": "step", "step": 2, "loss": 0.9},
               {"kind": "eval", "epoch": 1, "val/AP": 0.1},
               {"kind": "start"}, {"kind": "step", "step": 2, "loss": 0.8}, {"kind": "eval", "epoch": 1, "val/AP": 0.2},
               {"kind": "step", "step": 3, "loss": 0.7}]
    (tmp_path / METRICS_LOG).write_bytes(b"".join(line(r) for r in records))
    steps, evals = run_history(tmp_path)
    assert [(s["step"], s["loss"]) for s in steps] == [(1, 1.0), (2, 0.8), (3, 0.7)]
    assert evals == [{"kind": "eval", "epoch": 1, "val/AP": 0.2}]
