"""Shared by the serve tests and bench/serve.py: a tiny random checkpoint with a chat tokenizer, and a
live server on 127.0.0.1 (free port) in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "To be or not to be, that is the question. 12 + 7 = 19. 3 * 4 = 12. What is 2 + 3? 2 + 3 = 5. "
    "All that glitters is not gold; all who wander are not lost. Hello there, how are you today? "
) * 20


def make_chat_checkpoint(dir_: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random tiny-preset model (vocab 512, `layers` layers) + moonlet's chat tokenizer trained on a
    paragraph (special tokens and chat template as moonlet.data.tokenizer). Trains nothing else."""
    import moonlet
    from moonlet.config import preset
    from moonlet.data.tokenizer import train_tokenizer

    cfg = preset("tiny").replace(vocab_size=512, num_hidden_layers=layers)
    moonlet.CausalLM(cfg).init_weights(seed=seed).save_pretrained(dir_)
    train_tokenizer([TEXT], vocab_size=400).save(dir_)
    return Path(dir_)


class LiveServer:
    """`with LiveServer(engine, api_key=...) as srv:` -> srv.url serves the OpenAI API (srv.url + '/v1')."""

    def __init__(self, engine: Any, model_name: str = "tiny", graceful_timeout: float = 5.0, **kw: Any):
        from moonlet.serve import Server, create_app

        self.app = create_app(engine, model_name, **kw)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = Server(self.app, "127.0.0.1", self.port, graceful_timeout=graceful_timeout, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop()
        self.thread.join(30)
        self.sock.close()
