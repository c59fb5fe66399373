"""Security: a site runs only its own installed uharmony ClientApp, refuses code a server ships (a
foreign FAB), an unregistered key is refused, --insecure only on loopback. Real SuperLink + SuperNode."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
from fed_helpers import UHARMONY, Procs, env, join_args, wait_for, write_config

EVIL_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil-app"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "evil_app:serverapp"
clientapp = "evil_app:clientapp"

[tool.flwr.app.config]
out = ""
marker = ""
"""

EVIL_APP = '''import json, time
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

serverapp = ServerApp()
clientapp = ClientApp()


@serverapp.main()
def main(grid, context):
    nodes, t0 = [], time.time()
    while not nodes and time.time() - t0 < 60:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    msgs = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=90))
    with open(context.run_config["out"], "w") as f:
        json.dump([{"error": r.error.reason if r.has_error() else None} for r in replies], f)


@clientapp.train()
def train(msg, context):
    with open(context.run_config["marker"], "w") as f:  # what a hostile server would do at every site
        f.write("pwned")
    return Message(RecordDict(), reply_to=msg)
'''


@pytest.fixture(scope="module")
def link(fed_data, tmp_path_factory):
    """A SuperLink (TLS + site auth) with site A registered and joined."""
    root = tmp_path_factory.mktemp("security")
    config, port = write_config(root, fed_data, start_sites=1, min_sites=1, rounds=1)
    procs = Procs(root)
    try:
        # the coordinator's SuperLink alone: `fed serve` would also start our own run
        from uharmony.fed import flower

        home = root / "home"
        flower.write_cli_config(home, f"127.0.0.1:{port}", ca=str(fed_data["ca"]), insecure=False)
        keys = fed_data["root"] / "keys"
        p = subprocess.Popen([flower.tool("flower-superlink"), "--port", str(port), "--database", str(root / "s.db"),
                              "--ssl-ca-certfile", str(keys / "ca.crt"), "--ssl-certfile", str(keys / "server.crt"),
                              "--ssl-keyfile", str(keys / "server.key"), "--enable-supernode-auth",
                              "--disable-runtime-dependency-installation"],
                             env=flower.flower_env(home), cwd=root, stdout=open(root / "link.err", "wb"),  # noqa: SIM115
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.procs["link"] = p
        wait_for(lambda: (root / "link.err").read_text(errors="replace").count("Uvicorn running"), 60, "SuperLink",
                 procs)
        done = subprocess.run([*UHARMONY, "fed", "register", f"{fed_data['keys']['site-a']}.pub", "--config",
                               str(config)], env=env(), capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        procs.start("site-a", join_args(fed_data, "site-a", port))
        wait_for(lambda: "connected to the coordinator" in procs.out("site-a"), 90, "site A to connect", procs)
        yield {"root": root, "port": port, "home": home, "procs": procs}
    finally:
        procs.close()


def test_a_foreign_fab_is_refused_by_the_site(link):
    from uharmony.fed import flower

    root = link["root"]
    app = root / "evil"
    app.mkdir()
    (app / "pyproject.toml").write_text(EVIL_PYPROJECT, encoding="utf-8")
    (app / "evil_app.py").write_text(EVIL_APP, encoding="utf-8")
    out, marker = root / "replies.json", root / "pwned"
    (root / "evil-config.toml").write_text(f'out = "{out}"\nmarker = "{marker}"\n', encoding="utf-8")
    res = flower.flwr_cli(["run", str(app), "uharmony", "--run-config", str(root / "evil-config.toml")], link["home"],
                          timeout=120)
    assert res["success"], res
    wait_for(lambda: out.exists(), 150, "the foreign ServerApp's replies", link["procs"])
    replies = json.loads(out.read_text(encoding="utf-8"))
    assert len(replies) == 1
    assert "refused by the site" in (replies[0]["error"] or ""), replies
    assert "is not approved by this site" in replies[0]["error"]
    assert not marker.exists(), "the site ran code the server shipped"
    wait_for(lambda: "REFUSED code from the server" in link["procs"].out("site-a"), 30, "the site's refusal log")
    # and the site is still in the federation
    assert link["procs"].procs["site-a"].poll() is None


def test_the_approved_fab_is_our_own_app_only():
    from uharmony.fed.flower import app_fab_sha256
    from uharmony.fed.site_exec import approved_hashes

    assert approved_hashes({}) == {app_fab_sha256()}
    assert len(app_fab_sha256()) == 64 and app_fab_sha256() == app_fab_sha256()  # deterministic build


def test_an_unregistered_key_is_refused_with_exit_9(link, fed_data):
    p = subprocess.run([*UHARMONY, *join_args(fed_data, "site-b", link["port"], key="rogue")], env=env(),
                       capture_output=True, text=True, timeout=180, check=False)
    assert p.returncode == 9, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("uharmony: error:") and "not registered" in last
    assert "Traceback" not in p.stderr.split("uharmony: error:")[-1]
    events = [json.loads(x) for x in p.stdout.splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["code"] == 9


@pytest.mark.parametrize("server", ["10.1.2.3:9092", "example.org:9092"])
def test_insecure_is_refused_off_loopback(fed_data, server):
    p = subprocess.run([*UHARMONY, "fed", "join", "--server", server, "--data", str(fed_data["data"]["site-a"]),
                        "--insecure", "--progress", "none"], env=env(), capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "only when every end is on loopback" in p.stderr


def test_insecure_serve_on_all_interfaces_is_refused(fed_data, tmp_path):
    config, _ = write_config(tmp_path, fed_data)
    text = config.read_text().replace('address = "127.0.0.1:', 'insecure = true\naddress = "0.0.0.0:')
    config.write_text(text)
    p = subprocess.run([*UHARMONY, "fed", "serve", "--config", str(config)], env=env(), capture_output=True,
                       text=True, timeout=60, check=False)
    assert p.returncode == 2 and "loopback" in p.stderr and "Traceback" not in p.stderr


def test_keys_have_flower_formats_and_private_modes(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    p = subprocess.run([*UHARMONY, "fed", "keys", "ca", "--out", str(tmp_path), "--host", "coord.example.org",
                        "--host", "10.0.0.7"], env=env(), capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in san.get_values_for_type(x509.DNSName)} | \
        {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    assert names == {"localhost", "127.0.0.1", "::1", "coord.example.org", "10.0.0.7"}
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    p = subprocess.run([*UHARMONY, "fed", "keys", "site", "--name", "hosp-1", "--out", str(tmp_path)], env=env(),
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0
    pub_path, line = p.stdout.strip().splitlines()
    assert pub_path == str(tmp_path / "hosp-1.pub") and line.startswith("ecdsa-sha2-nistp384 ")
    assert isinstance(load_ssh_public_key(line.encode()), ec.EllipticCurvePublicKey)
    key = load_ssh_private_key((tmp_path / "hosp-1").read_bytes(), None)
    assert key.curve.name == "secp384r1"
    assert stat.S_IMODE(os.stat(tmp_path / "hosp-1").st_mode) == 0o600
    again = subprocess.run([*UHARMONY, "fed", "keys", "site", "--name", "hosp-1", "--out", str(tmp_path)], env=env(),
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 6 and "exists already" in again.stderr


def test_bad_fed_toml_key_is_one_line_exit_2(tmp_path):
    (tmp_path / "fed.toml").write_text('domains = ["a"]\nroundz = 3\n')
    p = subprocess.run([*UHARMONY, "fed", "serve", "--config", str(tmp_path / "fed.toml")], env=env(),
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == (f"uharmony: error: {tmp_path / 'fed.toml'}: unknown key 'roundz' (known: "
                                + p.stderr.split("(known: ")[1].strip())
    assert "Traceback" not in p.stderr




@pytest.mark.parametrize("case, problem", [
    ("no-ca", "CA certificate file does not exist"),
    ("ca-not-pem", "is not a PEM CA certificate"),
    ("no-key", "private key file does not exist"),
    ("key-not-a-key", "is not an unencrypted OpenSSH private key (make one with `uharmony fed keys site`)"),
    ("key-readable", "private key is readable by other users (chmod 600 it)"),
])
def test_join_refuses_a_bad_ca_or_key_with_one_line_naming_the_file(fed_data, tmp_path, case, problem):
    ca, key = str(fed_data["ca"]), tmp_path / "site-key"
    key.write_bytes(fed_data["keys"]["site-a"].read_bytes())
    key.chmod(0o600)
    named = key
    if case == "no-ca":
        ca = named = tmp_path / "missing-ca.crt"
    elif case == "ca-not-pem":
        named = tmp_path / "ca.crt"
        named.write_text("not a certificate\n")
        ca = named
    elif case == "no-key":
        key.unlink()
    elif case == "key-not-a-key":
        key.write_text("not a key\n")
    elif case == "key-readable":
        key.chmod(0o644)
    before = key.read_bytes() if key.exists() else None
    p = subprocess.run([*UHARMONY, "fed", "join", "--server", "127.0.0.1:9", "--data", str(fed_data["data"]["site-a"]),
                        "--ca", str(ca), "--key", str(key), "--progress", "none"], env=env(), capture_output=True,
                       text=True, timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"uharmony: error: {named}: {problem}"
    assert (key.read_bytes() if key.exists() else None) == before  # the input untouched


@pytest.mark.parametrize("content, problem", [
    (None, "public key file does not exist"),
    ("ssh-rsa AAAA not-a-key\n", "is not an OpenSSH public key (make one with `uharmony fed keys site`)"),
])
def test_register_refuses_a_missing_or_bad_public_key(fed_data, tmp_path, content, problem):
    config, _ = write_config(tmp_path, fed_data)
    pub = tmp_path / "site.pub"
    if content is not None:
        pub.write_text(content)
    p = subprocess.run([*UHARMONY, "fed", "register", str(pub), "--config", str(config)], env=env(),
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"uharmony: error: {pub}: {problem}"
