"""What test-boot.sh asks the booted image, as a client on the LAN would (the official SDK).

    check_api.py URL FINGERPRINT health
    check_api.py URL FINGERPRINT has-model KEY MODEL
    check_api.py URL FINGERPRINT chat KEY MODEL
    check_api.py URL FINGERPRINT update KEY VERSION STATE   the version that serves, the last update's state

An https URL is reached only through the certificate whose FINGERPRINT the box's key note
gives ("-" for a plain http URL), as a client that pins it would. Exit status 0 when the
answer is right; otherwise one line on stderr.
"""

from __future__ import annotations

import sys

import httpx
import openai

from edgellm.tls import TLSError, pinned_context


def main(url: str, fingerprint: str, command: str, *args: str) -> str:
    address = httpx.URL(url)
    verify = pinned_context(address.host, address.port or 443, fingerprint) if address.scheme == "https" else True
    if command == "health":
        response = httpx.get(f"{url}/health", timeout=10, verify=verify)
        assert response.status_code == 200, f"/health: {response.status_code} {response.text}"
        return response.text
    if command == "update":
        key, version, state = args
        response = httpx.get(f"{url}/health", timeout=10, verify=verify, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, f"/health: {response.status_code} {response.text}"
        health = response.json()
        update = health.get("update") or {}
        assert health.get("version") == version and update.get("state") == state, \
            f"version {health.get('version')}, update {update}; expected {version} and {state}"
        return f"version {version}, update: {update.get('message')}"
    key, model = args
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120,
                           http_client=httpx.Client(verify=verify))
    if command == "has-model":
        ids = [m.id for m in client.models.list()]
        assert model in ids, f"{model} not among {ids}"
        return f"models: {ids}"
    if command == "chat":
        try:
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0,
                          http_client=httpx.Client(verify=verify)).models.list()
            raise AssertionError("a wrong key was let in")
        except openai.AuthenticationError:
            pass
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=8, temperature=0)
        text = answer.choices[0].message.content
        assert text == "Once upon a time", f"unexpected answer {text!r}"
        if address.scheme == "https":  # no key in clear: plain HTTP gets no answer on this port
            try:
                httpx.get(f"http://{address.host}:{address.port}/health", timeout=10)
                raise AssertionError("the TLS port answered plain HTTP")
            except httpx.TransportError:
                pass
        return f"chat: {text!r} ({answer.usage.completion_tokens} tokens)"
    raise AssertionError(f"unknown command {command}")


if __name__ == "__main__":
    try:
        print(main(*sys.argv[1:]))
    except (AssertionError, httpx.HTTPError, openai.OpenAIError, ValueError, TLSError) as e:
        print(f"check_api: {e}", file=sys.stderr)
        sys.exit(1)
