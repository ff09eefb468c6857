"""The TorchServe sink writes the lines TorchServe's own metrics would, a batch's lines at once."""
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler import ts_handler
from handler.metrics import METRICS

YAML = Path(__file__).resolve().parents[2] / "monitoring" / "ts_metrics.yaml"


@pytest.fixture()
def cache():
    c = MetricsCacheYamlImpl(config_file_path=str(YAML))
    c.initialize_cache()
    return c


def _records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "ts.metrics.caching_metric"]


def _without_time(line: str) -> tuple[str, int]:
    head, stamp = line.rsplit(",", 1)
    return head, int(stamp)


def test_every_metric_line_is_torchserves_own(cache, caplog):
    sink = ts_handler.TorchServeSink(cache)
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    for spec in METRICS:
        labels = [f"{label}-value" for label in spec.labels]
        value = 0.25 if spec.kind != "counter" else 3
        caplog.clear()
        cache.get_metric(spec.name, ts_handler._TYPES[spec.kind]).add_or_update(value, labels)
        (theirs,) = _records(caplog)
        caplog.clear()
        sink.emit(spec.name, value, labels)
        sink.flush()
        (ours,) = _records(caplog)
        (t_head, t_time), (o_head, o_time) = _without_time(theirs), _without_time(ours)
        assert o_head == t_head and abs(o_time - t_time) <= 1


def test_a_batch_is_one_write_and_nothing_before_the_flush(cache, caplog):
    sink = ts_handler.TorchServeSink(cache)
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    sink.emit("mrl_batches_total", 1, ("m",))
    sink.emit("mrl_stage_seconds", 0.5, ("m", "decode"))
    assert _records(caplog) == []
    sink.flush()
    (one,) = _records(caplog)
    first, second = one.split("\n")
    assert first.startswith("[METRICS]mrl_batches_total.") and second.startswith("[METRICS]mrl_stage_seconds.")
    sink.flush()  # nothing left: no empty write
    assert len(_records(caplog)) == 1


def test_labels_that_do_not_match_the_declaration_are_refused(cache):
    with pytest.raises(ValueError, match="mrl_batches_total"):
        ts_handler.TorchServeSink(cache).emit("mrl_batches_total", 1, ("m", "extra"))


def test_a_batch_that_raises_still_flushes_its_lines(cache, caplog):
    sink = ts_handler.TorchServeSink(cache)

    class Failing:
        def handle(self, data, headers):
            sink.emit("mrl_batches_total", 1, ("m",))
            raise RuntimeError("boom")

    h = ts_handler.MRLHandler()
    h.service, h.sink = Failing(), sink
    context = SimpleNamespace(get_all_request_header=lambda i: {})
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    with pytest.raises(RuntimeError):
        h.handle([{"body": b""}], context)
    assert len(_records(caplog)) == 1


def test_the_worker_drops_torchserves_per_batch_received_line_and_nothing_else(caplog):
    """TorchServe's own message reader logs "Backend received inference at" for every batch; the
    handler's filter drops that record (the frontend would write it to model_log.log) and no other."""
    import socket
    import struct

    from ts.protocol.otf_message_handler import retrieve_msg

    def field(b: bytes) -> bytes:
        return struct.pack("!i", len(b)) + b

    end = struct.pack("!i", -1)
    # one request: id, no headers, one input named body, then the end of the batch
    message = (b"I" + field(b"req-1") + end + field(b"body") + field(b"application/octet-stream")
               + field(b"\x89PNG") + end + end)
    root = logging.getLogger()
    caplog.set_level(logging.INFO)
    a, b = socket.socketpair()
    try:
        a.sendall(message)
        cmd, batch = retrieve_msg(b)  # unfiltered: TorchServe's line is there
        assert cmd == b"I" and batch[0]["parameters"][0]["value"] == b"\x89PNG"
        assert any(r.getMessage().startswith("Backend received inference at") for r in caplog.records)
        caplog.clear()
        ts_handler.quiet_torchserve_worker(root)
        ts_handler.quiet_torchserve_worker(root)  # once per process, however often called
        assert root.filters.count(ts_handler._not_torchserve_received) == 1
        a.sendall(message)
        retrieve_msg(b)
        logging.info("Backend received something else at: %d", 1)
        messages = [r.getMessage() for r in caplog.records]
        assert not any(m.startswith("Backend received inference at") for m in messages), messages
        assert "Backend received something else at: 1" in messages
    finally:
        root.removeFilter(ts_handler._not_torchserve_received)
        a.close()
        b.close()


def _frame(n: str) -> bytes:
    """A batch the way the frontend frames it (TorchServe 0.12's wire format): ids, headers, bodies."""
    import struct

    def field(b: bytes) -> bytes:
        return struct.pack("!i", len(b)) + b

    end = struct.pack("!i", -1)
    msg = b"I"
    for i in range(3):
        msg += field(f"{n}-{i}".encode())
        for k, v in (("Host", "127.0.0.1"), ("Content-Type", "application/octet-stream"), ("X-Mrl-Top-K", str(i))):
            msg += field(k.encode()) + field(v.encode())
        msg += end + field(b"body") + field(b"application/octet-stream") + field(bytes(range(256)) * (40 * i + 1)) + end
    return msg + end


def _read_all(pieces: list[bytes], count: int):
    """The frames sent in ``pieces`` (cut anywhere), read back with TorchServe's ``retrieve_msg``."""
    import socket
    import threading

    from ts.protocol import otf_message_handler as otf

    a, b = socket.socketpair()

    def send():
        for p in pieces:
            a.sendall(p)
        a.close()

    t = threading.Thread(target=send)
    t.start()
    try:
        return [otf.retrieve_msg(b) for _ in range(count)]
    finally:
        t.join()
        b.close()


def test_buffered_reads_give_torchserve_the_same_frames_and_end_as_it_does(monkeypatch):
    from ts.protocol import otf_message_handler as otf

    monkeypatch.setattr(otf, "_retrieve_buffer", otf._retrieve_buffer)  # restored after the test
    frames = _frame("a") + _frame("b") + _frame("c")
    cuts = [0, 1, 7, 100, 101, 5000, len(frames) // 2, len(frames) - 3, len(frames)]
    pieces = [frames[i:j] for i, j in zip(cuts, cuts[1:])]
    theirs = _read_all(pieces, 3)
    assert [m[0]["requestId"] for _, m in theirs] == [b"a-0", b"b-0", b"c-0"]

    ts_handler.buffer_torchserve_reads()
    buffered = otf._retrieve_buffer
    assert buffered.buffered
    ts_handler.buffer_torchserve_reads()  # once per process, however often called
    assert otf._retrieve_buffer is buffered
    # one piece holding all three frames: the reader takes more than a frame at once and keeps the rest
    for sent in (pieces, [frames]):
        assert _read_all(sent, 3) == theirs
    with pytest.raises(SystemExit):  # the frontend closed the connection mid-frame, as TorchServe ends
        _read_all([frames[:-2]], 4)
