"""TLS without a certificate authority: the box's own certificate, pinned by its fingerprint.

Oracles we did not write: openssl computes the fingerprint and reads the certificate, curl
pins it (--pinnedpubkey), the openai SDK talks through the pinned client."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time

import httpx
import openai
import pytest
from conftest import Server
from test_cli import edgellm

from edgellm import tls
from edgellm.config import ConfigError, TLSFiles, from_dict

KEY = "sk-edgellm-" + "t" * 32


def openssl_fingerprint(pem: bytes) -> str:
    """sha256//BASE64 of the public key, by openssl (curl's manual gives this pipeline)."""
    key = subprocess.run(["openssl", "x509", "-pubkey", "-noout"], input=pem, capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=key, capture_output=True,
                         check=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=der, capture_output=True,
                            check=True).stdout
    encoded = subprocess.run(["base64"], input=digest, capture_output=True, check=True).stdout
    return "sha256//" + encoded.decode().strip()


def test_the_certificate_names_the_box_and_its_fingerprint_is_openssls(tmp_path):
    directory = tls.Directory(tmp_path / "tls")
    fingerprint = directory.make(tls.box_names("edgellm-ab12"))
    pem = (tmp_path / "tls" / "device.pem").read_bytes()
    assert fingerprint == openssl_fingerprint(pem) == directory.presented().fingerprint
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=pem, capture_output=True,
                          check=True).stdout.decode()
    assert "DNS:edgellm-ab12, DNS:edgellm-ab12.local, DNS:localhost" in text
    assert "prime256v1" in text and "CA:FALSE" in text and "IP Address" not in text  # names only
    assert b"PRIVATE KEY" in pem  # certificate and key in one file: one rename swaps both
    assert os.stat(tmp_path / "tls" / "device.pem").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "tls").st_mode & 0o777 == 0o700


def test_a_rotation_presents_the_old_certificate_until_its_time(tmp_path):
    directory = tls.Directory(tmp_path)
    old = directory.make(["box"])
    now = time.time()
    waiting = directory.rotate(["box"], grace=3600, now=now)
    assert waiting.fingerprint == old and waiting.next_fingerprint not in ("", old)
    assert directory.presented(now + 3599).fingerprint == old
    due = directory.presented(now + 3600)
    assert due.fingerprint == waiting.next_fingerprint and not due.next_fingerprint
    assert not directory.promote(now + 10) and directory.promote(now + 3600)
    assert directory.presented().fingerprint == waiting.next_fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.pem"]


def test_a_power_cut_in_a_rotation_leaves_a_certificate_that_is_whole(tmp_path):
    directory = tls.Directory(tmp_path)
    old = directory.make(["box"])
    # Cut after next.pem, before next-after: the old certificate, no rotation waiting.
    (tmp_path / "next.pem").write_bytes(tls.make(["box"])[0] + tls.make(["box"])[1])
    assert directory.presented().fingerprint == old and not directory.presented().next_fingerprint
    # Cut in the promotion, after the rename, before next-after went: it names a file that is gone.
    (tmp_path / "next.pem").unlink()
    (tmp_path / "next-after").write_text("0\n")
    assert directory.presented().fingerprint == old
    # A rotation after either is whole.
    rotated = directory.rotate(["box"], grace=0)
    assert rotated.fingerprint != old


@pytest.mark.parametrize("value,ok", [("auto", "auto"), ("off", "off"),
                                      ({"cert": "c.pem", "key": "k.pem"}, TLSFiles("c.pem", "k.pem")),
                                      ({"cert": "both.pem"}, TLSFiles("both.pem", "")),
                                      ("on", None), (True, None), ({"cert": "c", "pem": "x"}, None), ({}, None)])
def test_the_tls_setting(value, ok):
    if ok is None:
        with pytest.raises(ConfigError, match=r"\[server\] tls"):
            from_dict({"server": {"tls": value}}, "t.toml")
    else:
        assert from_dict({"server": {"tls": value}}, "t.toml").server.tls == ok
    assert from_dict({}, "t.toml").server.tls == "auto"


@pytest.fixture
def certificate(tmp_path):
    directory = tls.Directory(tmp_path / "own-tls")
    fingerprint = directory.make(["localhost"])
    return directory.file("device.pem"), fingerprint


@pytest.fixture
def tls_server(models, tmp_path, certificate):
    path, _ = certificate
    server = Server(models["scripted"], tmp_path, api_key=KEY,
                    config=f'[server]\napi_keys = ["{KEY}"]\ntls = {{cert = "{path}"}}\n')
    yield server
    server.stop()


def test_loopback_stays_plain_http_by_default(models, tmp_path):
    server = Server(models["scripted"], tmp_path)
    try:
        assert server.url.startswith("http://") and not (tmp_path / "state" / "tls").exists()
    finally:
        server.stop()


def test_the_openai_sdk_works_through_the_pinned_client_and_a_wrong_pin_is_refused(tls_server, certificate):
    _, fingerprint = certificate
    assert tls_server.url.startswith("https://127.0.0.1:")
    port = int(tls_server.url.rsplit(":", 1)[1])
    context = tls.pinned_context("127.0.0.1", port, fingerprint)
    with httpx.Client(verify=context) as http:
        client = openai.OpenAI(base_url=tls_server.base_url, api_key=KEY, max_retries=0, http_client=http)
        reply = client.completions.create(model="scripted", prompt="Hello", max_tokens=4, temperature=0)
    assert reply.choices[0].text
    other = tls.make(["localhost"])[0]
    with pytest.raises(tls.PinMismatch, match=re.escape(f"presents certificate {fingerprint}, not ")):
        tls.pinned_context("127.0.0.1", port, tls.fingerprint(other))
    # Without the pin, a client that verifies certificates trusts nothing it does not know.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls_server.url + "/health")
    # Plain HTTP gets no answer at all (the key it would send is already out: no redirect invites it).
    with pytest.raises(httpx.TransportError):
        httpx.get(tls_server.url.replace("https://", "http://") + "/health", timeout=10)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_pins_the_fingerprint(tls_server, certificate):
    _, fingerprint = certificate
    url = tls_server.url + "/v1/models"
    good = subprocess.run(["curl", "-sS", "-k", "--pinnedpubkey", fingerprint, url,
                           "-H", f"Authorization: Bearer {KEY}"], capture_output=True, text=True, timeout=30)
    assert good.returncode == 0 and '"scripted"' in good.stdout, good.stderr
    wrong = tls.fingerprint(tls.make(["localhost"])[0])
    bad = subprocess.run(["curl", "-sS", "-k", "--pinnedpubkey", wrong, url], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 90, bad.stderr  # CURLE_SSL_PINNEDPUBKEYNOTMATCH


def test_keys_and_prompts_never_cross_the_wire_in_clear(tls_server, certificate):
    """A relay between the client and the box records every byte both ways, as a capture on the
    LAN would see them."""
    _, fingerprint = certificate
    port = int(tls_server.url.rsplit(":", 1)[1])
    listener = socket.create_server(("127.0.0.1", 0))
    seen = bytearray()
    opened: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                seen.extend(chunk)
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:  # the other side went first
            pass

    def relay() -> None:
        for _ in range(4):  # the pin's own connection, then the client's
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", port))
            opened.extend((client, upstream))
            for ends in ((client, upstream), (upstream, client)):
                threads.append(threading.Thread(target=pump, args=ends, daemon=True))
                threads[-1].start()

    accepting = threading.Thread(target=relay, daemon=True)
    accepting.start()
    relayed = listener.getsockname()[1]
    try:
        context = tls.pinned_context("127.0.0.1", relayed, fingerprint)
        prompt = "the secret plans of the cat who sat on the mat"
        with httpx.Client(verify=context, timeout=60) as http:
            response = http.post(f"https://127.0.0.1:{relayed}/v1/completions",
                                 headers={"Authorization": f"Bearer {KEY}"},
                                 json={"model": "scripted", "prompt": prompt, "max_tokens": 4})
        assert response.status_code == 200
        assert seen[:1] == b"\x16" and len(seen) > 500  # TLS handshake records
        assert KEY.encode() not in seen and prompt.encode() not in seen and b"Authorization" not in seen
        assert b"scripted" not in seen and b"HTTP/1.1" not in seen
    finally:
        listener.close()
        accepting.join(5)
        for each in opened:
            each.close()
        for thread in threads:
            thread.join(5)


def test_tls_show_and_rotate(tmp_path):
    directory = tmp_path / "tls"
    made = edgellm("tls", "rotate", "--dir", str(directory))
    assert made.returncode == 0 and "made the first certificate" in made.stdout, made.stderr
    first = made.stdout.split("fingerprint: ")[1].split()[0]
    assert first == openssl_fingerprint((directory / "device.pem").read_bytes())
    rotated = edgellm("tls", "rotate", "--dir", str(directory), "--grace", "2h")
    assert rotated.returncode == 0 and f"fingerprint: {first}" in rotated.stdout
    upcoming = rotated.stdout.split("next:")[1].split()[0]
    assert upcoming != first and "presented from" in rotated.stdout
    shown = edgellm("tls", "show", "--dir", str(directory))
    assert shown.stdout == rotated.stdout
    bad = edgellm("tls", "rotate", "--dir", str(directory), "--grace", "soon")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--grace" in bad.stderr
    missing = edgellm("tls", "show", "--dir", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no certificate here" in missing.stderr


def test_a_certificate_that_is_not_one_is_a_clear_error_at_start(models, tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    (tmp_path / "edgellm.toml").write_text(f'[server]\ntls = {{cert = "{bogus}"}}\n')
    result = edgellm("serve", "--model", str(models["scripted"]), "--config", str(tmp_path / "edgellm.toml"),
                     "--port", "0")
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "not an X.509 certificate" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_pinned_context_verifies_every_connection(tls_server, certificate):
    """The context trusts the one certificate it was made with, not whatever a later connection
    presents."""
    _, fingerprint = certificate
    port = int(tls_server.url.rsplit(":", 1)[1])
    context = tls.pinned_context("127.0.0.1", port, fingerprint)
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw) as wrapped:
        assert tls.fingerprint(wrapped.getpeercert(binary_form=True)) == fingerprint
    impostor_cert, impostor_key = tls.make(["localhost"])
    pem = tls_server.state_dir.parent / "impostor.pem"
    pem.write_bytes(impostor_cert + impostor_key)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pem)
    impostor = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        conn, _ = impostor.accept()
        try:
            with server_context.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            conn.close()

    accepting = threading.Thread(target=accept, daemon=True)
    accepting.start()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{impostor.getsockname()[1]}/health", verify=context)
    accepting.join(5)
    impostor.close()
