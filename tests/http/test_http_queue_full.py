"""A full decode daemon answers the HTTP API with 429 and OpenAI's error shape.

A real pair of daemons (no TLS) with a cache of 40 blocks and ``--max-waiting 0``:
one streamed completion holds most blocks for 600 tokens (a checkpoint whose greedy
run does not stop earlier, so the window stays open however fast the engine is), a
second one finds neither blocks nor a place in the queue and gets 429
``RESOURCE_EXHAUSTED``; the first one still ends with the monolithic run's text and
the daemon serves the next request.
"""

from __future__ import annotations

import time

import httpx
import pytest
from engines import BACKENDS, available
from http_kit import BLOCK_SIZE, Reference, write_checkpoint
from kvbridge.connector.serving.procs import DaemonProcess, free_port

openai = pytest.importorskip("openai")
BACKEND = next((b for b in BACKENDS if available(b)), None)
MODEL_DIR = "tiny-queue-llama"
NUM_BLOCKS = 40  # 640 tokens of cache
PROMPT, HOLD = "abc", 600  # 3 + 600 tokens: 38 of the 40 blocks


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if BACKEND is None:
        pytest.skip("no transfer engine installed")
    tmp = tmp_path_factory.mktemp("http-full")
    for seed in range(int(time.time()) % 10_000, 10_100):  # one that runs HOLD tokens
        ckpt = write_checkpoint(tmp / MODEL_DIR, seed=seed)
        ref = Reference(ckpt)
        if len(ref.tokens(PROMPT, HOLD)) == HOLD:
            break
    common = ["--insecure", "--backend", BACKEND, "--num-blocks", str(NUM_BLOCKS),
              "--block-size", str(BLOCK_SIZE), "--metrics-port", "0", "--model-path",
              str(ckpt), "--side-port", "0"]  # fmt: skip
    pport = free_port()
    prefill = DaemonProcess("prefill", [*common, "--grpc-port", str(pport)], tmp, "full-p")
    decode = DaemonProcess("decode", [*common, "--grpc-port", "0", "--http-port", "0",
                           "--max-waiting", "0", "--prefill", f"127.0.0.1:{pport}"],
                           tmp, "full-d")  # fmt: skip
    procs = [prefill.start(), decode.start()]
    try:
        for p in procs:
            p.wait_ready(90)
        yield decode, ref
    finally:
        codes = [p.terminate(30) for p in (decode, prefill)]
    assert codes == [0, 0], decode.log_tail()


def test_a_full_cache_and_queue_answer_429_and_the_running_request_is_unharmed(pair):
    decode, ref = pair
    client = openai.OpenAI(api_key="unused", base_url=decode.http_url + "/v1", max_retries=0,
                           http_client=httpx.Client(timeout=120))  # fmt: skip
    prompt, n = PROMPT, HOLD
    stream = client.completions.create(model=MODEL_DIR, prompt=prompt, max_tokens=n, stream=True)
    chunks = iter(stream)
    text = next(chunks).choices[0].text  # the first token: the blocks are held now
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL_DIR, prompt="a longer prompt here", max_tokens=20)
    assert err.value.status_code == 429 and "busy" in str(err.value), err.value
    text += "".join(c.choices[0].text for c in chunks)
    assert text == ref.text(prompt, n)  # the running request never noticed
    out = client.completions.create(model=MODEL_DIR, prompt="x", max_tokens=4)
    assert out.choices[0].text == ref.text("x", 4)  # served again once blocks are free
