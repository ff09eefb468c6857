"""The load client's HTTP/1.1: answers sized by Content-Length, chunked or by the close, kept-alive
connections reused, and one the server closed while idle retried once."""
import json
import socket
import threading

import pytest

from client.http import Client, run_load


class _Server:
    """Answers each request on a connection with the next of ``answers`` (raw bytes); after the
    list, closes. Records the requests' heads."""

    def __init__(self, answers_per_connection):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.plans = list(answers_per_connection)
        self.heads: list[bytes] = []
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while self.plans:
            conn, _ = self.sock.accept()
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn, self.plans.pop(0)), daemon=True).start()

    def _answer(self, conn, answers):
        buf = b""
        with conn:
            for answer in answers:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:  # the client closed its connection
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                n = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
                while len(buf) < n:
                    buf += conn.recv(65536)
                buf = buf[n:]
                self.heads.append(head)
                conn.sendall(answer)


def _ok(body: dict, **extra) -> bytes:
    raw = json.dumps(body).encode()
    fields = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n{fields}\r\n".encode() + raw


def test_content_length_chunked_and_close_delimited_answers_on_one_client():
    chunked = (b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\n{\"cod\r\n8\r\ne\": 503}\r\n0\r\nX-Trailer: 1\r\n\r\n")
    closing = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"last\": true}"
    srv = _Server([[_ok({"label": "a"}), _ok({"label": "b"}), chunked, closing], [_ok({"again": 1})]])
    c = Client(f"http://127.0.0.1:{srv.port}", "secret", "m", timeout=10)
    body = bytes(range(256)) * 60
    assert c.predict(body).body == {"label": "a"}
    r = c.predict(body, headers={"X-MRL-Top-K": "2"})
    assert (r.status, r.body) == (200, {"label": "b"})
    r = c.predict(body)
    assert (r.status, r.body) == (503, {"code": 503})
    assert c.predict(body, path="/models/m/invoke").body == {"last": True}
    assert c.predict(body).body == {"again": 1}  # a new connection after the close
    assert srv.connections == 2
    first = srv.heads[0].decode()
    assert first.startswith("POST /predictions/m HTTP/1.1\r\n")
    assert "Authorization: Bearer secret" in first and f"Content-Length: {len(body)}" in first
    assert "X-MRL-Top-K: 2" in srv.heads[1].decode()
    assert srv.heads[3].decode().startswith("POST /models/m/invoke HTTP/1.1")


def test_a_connection_closed_while_idle_is_retried_once_and_a_dead_server_fails():
    srv = _Server([[_ok({"n": 1})], [_ok({"n": 2})]])  # the server closes after each answer, unannounced
    c = Client(f"http://127.0.0.1:{srv.port}", None, timeout=10)
    assert c.predict(b"x").body == {"n": 1}
    assert c.predict(b"x").body == {"n": 2}  # the kept connection was dead: retried on a new one
    srv.sock.close()
    with pytest.raises(OSError):
        c.predict(b"x")


def test_run_load_answers_every_request_once_in_order():
    srv = _Server([[_ok({"i": i}) for i in range(30)] for _ in range(3)])
    results = run_load(Client(f"http://127.0.0.1:{srv.port}", None, timeout=10), [b"a", b"b"],
                       concurrency=3, count=30)
    assert [r.index for r in results] == list(range(30))
    assert all(r.status == 200 for r in results)


def test_an_answer_cut_off_part_way_is_an_error_not_a_retry():
    cut = _ok({"label": "a" * 100})[:-20]  # the server closes 20 bytes short of its Content-Length
    srv = _Server([[_ok({"n": 1}), cut], [_ok({"n": 2})]])
    c = Client(f"http://127.0.0.1:{srv.port}", None, timeout=10)
    assert c.predict(b"x").body == {"n": 1}
    with pytest.raises(ConnectionResetError, match="inside an answer's body"):
        c.predict(b"x")
    assert c.predict(b"x").body == {"n": 2}  # the next request on a new connection
    assert srv.connections == 2
