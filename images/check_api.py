"""What test-boot.sh asks the booted image, as a client on the LAN would (the official SDK).

    check_api.py URL health
    check_api.py URL has-model KEY MODEL
    check_api.py URL chat KEY MODEL

Exit status 0 when the answer is right; otherwise one line on stderr.
"""

from __future__ import annotations

import sys

import httpx
import openai


def main(url: str, command: str, *args: str) -> str:
    if command == "health":
        response = httpx.get(f"{url}/health", timeout=10)
        assert response.status_code == 200, f"/health: {response.status_code} {response.text}"
        return response.text
    key, model = args
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    if command == "has-model":
        ids = [m.id for m in client.models.list()]
        assert model in ids, f"{model} not among {ids}"
        return f"models: {ids}"
    if command == "chat":
        try:
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
            raise AssertionError("a wrong key was let in")
        except openai.AuthenticationError:
            pass
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=8, temperature=0)
        text = answer.choices[0].message.content
        assert text == "Once upon a time", f"unexpected answer {text!r}"
        return f"chat: {text!r} ({answer.usage.completion_tokens} tokens)"
    raise AssertionError(f"unknown command {command}")


if __name__ == "__main__":
    try:
        print(main(*sys.argv[1:]))
    except (AssertionError, httpx.HTTPError, openai.OpenAIError, ValueError) as e:
        print(f"check_api: {e}", file=sys.stderr)
        sys.exit(1)
