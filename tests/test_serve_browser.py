"""The chat page in a real headless browser (Debian's chromium driven by Playwright for Python).

Skips with a message when the browser or the Python package is missing: `make browser-deps` installs
both (apt chromium + pip playwright; never `playwright install`, the system browser is used).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from _serve_fixtures import LiveServer, make_chat_checkpoint

CHROMIUM = os.environ.get("MOONLET_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.slow

if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no chromium at {CHROMIUM}: run `make browser-deps` (apt-get install chromium) to test the chat page",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the `playwright` package is missing: `make browser-deps` (pip install playwright)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_chat_page_streams_a_reply(tmp_path):
    from moonlet.infer.engine import Engine, SamplingParams

    engine = Engine.from_pretrained(make_chat_checkpoint(tmp_path / "tiny"), max_batch=4)
    key = "browser-key"
    with LiveServer(engine, api_key=key) as srv, sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                    headless=True, args=ARGS)
        try:
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            bodies: list[dict] = []
            page.on("request", lambda r: bodies.append(json.loads(r.post_data))
                    if r.url.endswith("/v1/chat/completions") else None)
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
            page.fill("#api-key", key)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "40")

            # count how often the reply's text changes while it arrives: streamed, not all at once
            page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
            page.fill("#input", "Hello there, how are you today?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='1']")
            reply = page.inner_text(".msg.assistant .text")
            meta = page.inner_text(".msg.assistant .meta")

            msgs = [{"role": "user", "content": "Hello there, how are you today?"}]
            ids = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
            ref = engine.generate([ids], SamplingParams(max_new_tokens=40))[0]
            assert reply == ref.text.strip() or reply == ref.text  # (inner_text trims edge whitespace)
            assert ref.completion_tokens > 3 and page.evaluate("window.updates") > 3
            assert "tokens/s" in meta and f"{ref.completion_tokens} tokens" in meta, meta
            assert page.locator(".msg.error").count() == 0

            # the conversation is kept: the second request carries both earlier turns
            page.fill("#input", "And then?")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='1']\").length === 2")
            assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
            assert bodies[-1]["messages"][1]["content"] == ref.text
            assert bodies[-1]["temperature"] == 0 and bodies[-1]["max_tokens"] == 40 and bodies[-1]["stream"] is True
        finally:
            ctx.close()
