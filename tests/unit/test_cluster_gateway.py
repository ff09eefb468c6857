"""The gateway's HAProxy configuration and its files, without a server (test_cluster.py runs them)."""
import subprocess

from model_store import cluster as cl
from tests import deps


def test_the_generated_config_is_valid_haproxy(tmp_path):
    deps.need_binary("haproxy", "haproxy")
    c = cl.Cluster(home=tmp_path / "cluster", replicas=2)
    cl.write_private(c.key_map, "replica0 k0\nreplica1 k1\n")
    acl = tmp_path / "keys.acl"
    acl.write_text("some-key-of-16-chars\n")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(cl.haproxy_config(c, acl))
    checked = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr


def test_stop_removes_the_gateway_sockets(tmp_path):
    c = cl.Cluster(home=tmp_path / "cluster", replicas=2)
    c.socket_dir.mkdir(mode=0o700)
    (c.socket_dir / "replica0.sock").touch()
    c.stats_socket.touch()
    cl.stop(c)
    assert not c.socket_dir.exists() and not c.stats_socket.exists()


def test_private_files_are_0600_whatever_their_old_mode(tmp_path):
    path = tmp_path / "keys.acl"
    path.write_text("old\n")
    path.chmod(0o644)
    cl.write_private(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.acl"]  # no temp file left
