"""The built-in chat page, driven in headless Chromium (Debian's chromium, through Playwright): type a message,
send it, read the streamed answer; it must equal what the API returns for the same request."""
import shutil
from pathlib import Path

import pytest
import requests

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_page_is_served_without_the_api_key(smollm2_special_server):
    """The page is static (the key goes into its settings); the API behind it still needs the key."""
    server = smollm2_special_server
    r = requests.get(f"{server.base_url}/chat", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert 'id="prompt"' in r.text and "/v1/chat/completions" in r.text
    assert requests.get(f"{server.base_url}/v1/models", timeout=30).status_code == 401


def test_chat_page_streams_an_answer(smollm2_server, tmp_path):
    from playwright import sync_api  # the test extra has it: missing fails, never skips
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (.ci/run installs it: apt-get install chromium)"
    server = smollm2_server
    question = "Name three colors."
    # both requests start from an empty prefix cache: a cached prefix changes the prefill's shapes, and with
    # quantized activations a near-tie token can flip with them (seen on an Intel Xeon: "Blue" / "Black")
    assert requests.post(f"{server.base_url}/flush_cache", timeout=30).status_code == 200
    expected = server.openai().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
    ).choices[0].message.content
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(f"{server.base_url}/")
            page.wait_for_function("document.getElementById('model').textContent === 'smollm2'", timeout=60_000)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.fill("#prompt", question)
            assert requests.post(f"{server.base_url}/flush_cache", timeout=30).status_code == 200
            page.keyboard.press("Enter")  # Enter sends
            answer = page.locator(".msg.assistant").last
            # the stream shows partial text before it is done
            page.wait_for_function(
                "() => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
                " return a && a.querySelector('.content').textContent.length > 0; }", timeout=120_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.msg.assistant')].pop().dataset.state !== 'streaming'",
                timeout=120_000)
            assert answer.get_attribute("data-state") == "done", answer.inner_text()
            assert answer.locator(".content").text_content() == expected
            assert "finish: " in answer.locator(".meta").text_content()
            assert page.locator(".msg.user .content").last.text_content() == question
            page.screenshot(path=str(tmp_path / "chat_page.png"))  # docs/chat_page.png is one of these
        finally:
            browser.close()
