"""``prunekit serve-dllm``: the continuous-batching engine is exact per request, and the
OpenAI-compatible server (started from the CLI in a subprocess, tiny random LLaDA and Dream
folders in the published layouts) answers, streams, refuses, frees and drains as documented.

Exactness tests run the models in float64, so that equality of ids does not depend on the
reduction order of batched kernels (batch composition, padding, thread count)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from pipelines.generate import dllm_generate
from pipelines.serve_dllm import DecodeOptions, Engine, QueueFull
from pipelines.serve_dllm.metrics import Histogram, Metrics
from pipelines.serve_dllm.text import TextAssembler, held_back
from tests.helpers.dllm_folders import write_folder
from tokenprune.localleap import load_dllm, localleap_generate

ROOT = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
F64 = torch.float64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    llada = write_folder(base / "llada", "llada")
    dream = write_folder(base / "dream", "dream")
    cfg_path = dream / "tokenizer_config.json"  # Dream-Instruct ships a chat template; the base has none
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return {"llada": llada, "dream": dream}


@pytest.fixture(scope="module")
def loaded(folders):
    torch.set_num_threads(1)
    return {fam: load_dllm(folder, device="cpu", dtype=F64) for fam, folder in folders.items()}


def alone(model, prompt, max_tokens, opts: DecodeOptions, seed=None):
    """``localleap_generate`` on the prompt alone: (tokens cut at EOS and max_tokens, row NFE)."""
    gen_length = -(-max_tokens // opts.block_length) * opts.block_length
    eos = model.config.eos_token_id
    res = localleap_generate(
        model,
        [prompt],
        gen_length=gen_length,
        mask_id=model.config.mask_token_id,
        eos_id=eos,
        early_stop=True,  # the text up to EOS is that of early_stop=False; the NFE is what the server spends
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        **opts.generate_kwargs(),
    )
    ids = res.generated[0].tolist()
    ids = ids[: ids.index(eos)] if eos in ids else ids
    return ids[:max_tokens], int(res.row_nfe[0])


def make_engine(model, **kwargs) -> Engine:
    c = model.config
    return Engine(model, mask_id=c.mask_token_id, eos_id=c.eos_token_id, pad_id=c.eos_token_id, **kwargs)


def mixed_requests(vocab: int, n: int, seed: int):
    """Prompts of different lengths, max_tokens (some not whole blocks), rules and sampling."""
    g = torch.Generator().manual_seed(seed)
    rules = ["localleap", "fastdllm", "llada", "eb"]
    out = []
    for i in range(n):
        prompt = torch.randint(0, vocab, (1 + (5 * i) % 11,), generator=g).tolist()
        temperature = 0.0 if i % 3 else 0.8
        opts = dict(rule=rules[i % 4], temperature=temperature, top_k=5 if i % 5 == 4 else None)
        out.append((prompt, [8, 12, 6, 16][i % 4], opts, 100 + i))
    return out


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_engine_batch_equals_each_request_alone(loaded, family, cache):
    model, _ = loaded[family]
    engine = make_engine(model, max_batch=5, max_queue=100)
    reqs = []
    for prompt, max_tokens, opts, seed in mixed_requests(40, 12, seed=1):
        o = DecodeOptions(block_length=4, cache=cache, **opts)
        reqs.append((engine.submit(prompt, max_tokens, o, seed=seed), prompt, max_tokens, o, seed))
    engine.run_until_idle()
    row_passes = 0
    for req, prompt, max_tokens, opts, seed in reqs:
        res = req.wait(0)
        assert (res.tokens, res.forward_passes) == alone(model, prompt, max_tokens, opts, seed)
        assert res.finish_reason in ("stop", "length")
        st = res.stats  # the request's TokenStats (the server's "dllm" field)
        assert (st.method, st.tokens_in, st.tokens_kept) == ("localleap", req.gen_length, res.tokens_committed)
        assert st.forward_passes == res.forward_passes == sum(st.extras["block_forward_passes"])
        row_passes += res.forward_passes
    assert engine.passes < row_passes  # rows really shared passes


def test_engine_cancel_frees_the_row_and_others_are_unaffected(loaded):
    model, _ = loaded["llada"]
    engine = make_engine(model, max_batch=3)
    opts = DecodeOptions(rule="llada", block_length=4, cache="dual")
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    reqs = [engine.submit(p, 24, opts) for p in prompts]
    for _ in range(6):  # mid-block of the second block
        engine.step()
    reqs[1].cancel()
    engine.step()
    assert len(engine.rows) == 2 and reqs[1].wait(0).finish_reason == "cancelled"
    engine.run_until_idle()
    for i in (0, 2):
        assert (reqs[i].wait(0).tokens, reqs[i].wait(0).forward_passes) == alone(model, prompts[i], 24, opts)


def test_engine_queue_bound_and_fifo_across_block_shapes(loaded):
    model, _ = loaded["dream"]
    engine = make_engine(model, max_batch=4, max_queue=3)
    a, b = DecodeOptions(block_length=4), DecodeOptions(block_length=8, cache="prefix")
    reqs = [(engine.submit([3, 4, 5], 8, o), o) for o in (a, b, a)]
    with pytest.raises(QueueFull):
        engine.submit([3], 8, a)
    with pytest.raises(ValueError, match="steps"):
        engine.submit([3], 8, DecodeOptions(rule="llada", steps=3, block_length=4))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([3], 0, a)
    engine.step()
    assert len(engine.rows) == 1  # the second request has another block shape: it waits, and so does the third
    engine.run_until_idle()
    for req, o in reqs:
        assert (req.wait(0).tokens, req.wait(0).forward_passes) == alone(model, [3, 4, 5], 8, o)


def test_text_assembler_holds_back_stop_prefixes_and_joins_to_the_text():
    words = {1: "ab", 2: "c", 3: "d", 4: "\ufffd"}

    def decode(ids):
        return "".join(words[i] for i in ids)

    t = TextAssembler(decode, ["cd", "zz"])
    assert t.feed([1]) == "ab"
    assert t.feed([2]) == ""  # "c" may start the stop string "cd"
    assert t.feed([3, 1]) == "" and t.stopped and t.text == "ab" and t.tokens_used() == 1
    t = TextAssembler(decode, ["cd"])
    parts = [t.feed([1, 2]), t.feed([1]), t.finish()]
    assert parts == ["ab", "cab", ""] and "".join(parts) == t.text
    assert held_back("ab\ufffd", []) == 1 and held_back("xc", ["cd"]) == 1 and held_back("x", ["cd"]) == 0


def test_metrics_text_format():
    h = Histogram((1, 2))
    for v in (0.5, 1.5, 9):
        h.observe(v)
    assert h.lines("x") == [
        'x_bucket{le="1"} 1',
        'x_bucket{le="2"} 2',
        'x_bucket{le="+Inf"} 3',
        "x_sum 11.0",
        "x_count 3",
    ]
    m = Metrics()
    m.on_pass(3, 2)
    m.on_generation(tokens_in=5, tokens_out=4, forward_passes=2, latency_s=0.2, first_block_s=0.1, cancelled=False)
    text = m.render()
    assert "dllm_row_forward_passes_total 2" in text and "dllm_tokens_out_total 4" in text
    assert 'dllm_forward_passes_per_token_bucket{le="0.5"} 1' in text


def test_benchmark_quick_prints_its_table(capsys):
    spec = importlib.util.spec_from_file_location("dllm_serve", ROOT / "benchmarks" / "dllm_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sequential, one, eight = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| sequential dllm_generate |" in out and "| serve, concurrency 8 |" in out
    assert sequential["tokens"] == one["tokens"] == eight["tokens"] > 0  # the same answers, batched or not
    assert eight["passes"] < one["passes"]  # concurrent requests shared passes


# ---- the server, started from the CLI ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m pipelines.cli serve-dllm FOLDER ...`` in a subprocess; ``url``, ``proc``."""

    def __init__(self, folder, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pipelines.cli", "serve-dllm", str(folder), "--port", str(self.port)]
        cmd += ["--threads", "1", "--precision", "float64", "--device", "cpu", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError("server did not start")

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def llada_server(folders):
    server = Server(folders["llada"], "--block-length", "4", "--cache", "dual", "--max-tokens", "8", "--max-batch", "8")
    yield server
    server.stop()


def client_for(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def expected_text(model, tok, prompt: str, max_tokens: int, opts: DecodeOptions, seed=None):
    """``dllm_generate`` on the prompt alone (canvas = whole blocks), cut at ``max_tokens``."""
    gen_length = -(-max_tokens // opts.block_length) * opts.block_length
    kwargs = opts.generate_kwargs()
    block_length = kwargs.pop("block_length")
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    out = dllm_generate(model, prompt, tokenizer=tok, gen_length=gen_length, block_length=block_length, **kwargs)
    ids = out.generated[0].tolist()
    eos = model.config.eos_token_id
    cut = (ids[: ids.index(eos)] if eos in ids else ids)[:max_tokens]
    if max_tokens == gen_length:
        assert tok.decode(cut, skip_special_tokens=True) == out.texts[0]
    return tok.decode(cut, skip_special_tokens=True)


@pytest.mark.slow
def test_server_16_concurrent_greedy_requests_equal_sequential_dllm_generate(llada_server, loaded):
    model, tok = loaded["llada"]
    client = client_for(llada_server)
    opts = DecodeOptions(block_length=4, cache="dual")
    jobs = [(" ".join(f"w{(7 * i + j) % 40}" for j in range(1 + i)), [8, 4, 12, 6][i % 4]) for i in range(16)]

    def ask(job):
        return client.completions.create(model="llada", prompt=job[0], max_tokens=job[1], temperature=0)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, max_tokens), resp in zip(jobs, answers):
        assert resp.choices[0].text == expected_text(model, tok, prompt, max_tokens, opts)
        ids = tok.encode(prompt)
        _, nfe = alone(model, ids, max_tokens, opts)
        assert resp.usage.prompt_tokens == len(ids)
        extra = resp.model_extra["dllm"]
        assert extra["forward_passes"] == nfe == sum(extra["block_forward_passes"])
        assert extra["method"] == "localleap" and extra["cache"] == "dual"
    text = httpx.get(llada_server.url + "/metrics").text
    assert 'dllm_pass_batch_size_bucket{le="1"}' in text
    single = float(text.split('dllm_pass_batch_size_bucket{le="1"} ')[1].split()[0])
    assert single < llada_server.metric("dllm_pass_batch_size_count")  # some passes ran several rows


@pytest.mark.slow
def test_server_seeded_sampling_and_overrides_are_per_request(llada_server, loaded):
    model, tok = loaded["llada"]
    client = client_for(llada_server)
    extra = {"rule": "eb", "cache": "prefix", "block_length": 8}
    opts = DecodeOptions(rule="eb", cache="prefix", block_length=8, temperature=0.9, top_p=0.95)
    prompt = "w3 w1 w4 w1 w5"

    def ask(seed):
        return client.completions.create(
            model="llada", prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.95, seed=seed, extra_body=extra
        )

    with ThreadPoolExecutor(3) as pool:
        a, b, c = pool.map(ask, [7, 7, 8])
    assert a.choices[0].text == b.choices[0].text == expected_text(model, tok, prompt, 16, opts, seed=7)
    assert c.choices[0].text == expected_text(model, tok, prompt, 16, opts, seed=8)
    assert a.model_extra["dllm"]["rule"] == "eb" and a.model_extra["dllm"]["block_length"] == 8


@pytest.mark.slow
def test_server_stream_joins_to_the_non_streamed_text(llada_server):
    client = client_for(llada_server)
    kwargs = dict(model="llada", prompt="w9 w8 w7", max_tokens=16, extra_body={"rule": "llada"})
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert len([c for c in chunks if c.choices[0].text]) >= 2  # one chunk per committed block
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].model_extra["dllm"]["forward_passes"] == full.model_extra["dllm"]["forward_passes"]
    words = full.choices[0].text.split()
    stop = " ".join(words[3:5])  # a stop string inside the text, across a block boundary
    stopped = client.completions.create(stop=[stop], **kwargs)
    streamed = list(client.completions.create(stop=[stop], stream=True, **kwargs))
    assert stopped.choices[0].text == full.choices[0].text.split(stop)[0]
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    raw = httpx.post(
        llada_server.url + "/v1/completions", json={**kwargs["extra_body"], "prompt": "w1", "stream": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.text.endswith("data: [DONE]\n\n")


BAD = [
    (b'{"prompt": "w1", "max_tokens": ', 400, None),  # malformed JSON
    (b'["w1"]', 400, None),  # not an object
    ({"prompt": "w1", "max_tokens": "8"}, 400, "max_tokens"),  # wrong type
    ({"prompt": "w1", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "w1", "stream": "yes"}, 400, "stream"),
    ({"prompt": "w1", "threshold": [0.9]}, 400, "threshold"),
    ({"prompt": "w1", "frobnicate": 1}, 400, "frobnicate"),  # unknown field
    ({"prompt": "w1", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "w1", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "w1 " * 4000, "max_tokens": 200}, 400, "prompt"),  # longer than the context (4096)
    ({"prompt": "w1", "n": 2}, 400, "n"),
    ({"prompt": "w1", "rule": "magic"}, 400, "rule"),
    ({"prompt": "w1", "threshold": 1.5}, 400, None),
    ({"prompt": "w1", "rule": "llada", "steps": 3}, 400, None),
    ({"prompt": "", "max_tokens": 4}, 400, "prompt"),
    ({"prompt": [1, 99999]}, 400, None),  # token ids outside the vocabulary
    ({"prompt": "w1", "seed": -1}, 400, None),
    ({"prompt": "w1", "block_length": 0}, 400, None),
    ({"prompt": "w1", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.slow
@pytest.mark.parametrize("body,status,param", BAD)
def test_server_bad_requests_get_openai_errors(llada_server, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(llada_server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(llada_server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in r.text and err["param"] == param and err["code"] == status


@pytest.mark.slow
def test_server_chat_without_a_template_is_a_clear_400(llada_server):
    r = httpx.post(llada_server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "w1"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    r = httpx.post(llada_server.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


@pytest.mark.slow
def test_server_disconnect_mid_stream_frees_the_slot(llada_server, loaded):
    model, tok = loaded["llada"]
    cancelled = llada_server.metric("dllm_requests_cancelled_total")
    long = {"prompt": "w1 w2", "max_tokens": 3000, "stream": True, "rule": "llada"}  # minutes if not freed
    other = {}

    def ask_other():  # in flight at the same time, must be unaffected
        other["resp"] = httpx.post(llada_server.url + "/v1/completions", json={"prompt": "w5 w6", "max_tokens": 8})

    with httpx.Client(timeout=60) as http:
        with http.stream("POST", llada_server.url + "/v1/completions", json=long) as r:
            thread = threading.Thread(target=ask_other)
            thread.start()
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    thread.join()
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(llada_server.url + "/v1/completions", json={**long, "stream": False}, timeout=1.0)
    deadline = time.monotonic() + 120  # a loaded CI machine notices a gone client late
    while llada_server.metric("dllm_requests_cancelled_total") < cancelled + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llada_server.metric("dllm_requests_cancelled_total") == cancelled + 2
    assert llada_server.metric("dllm_batch_size") == 0
    opts = DecodeOptions(block_length=4, cache="dual")
    assert other["resp"].json()["choices"][0]["text"] == expected_text(model, tok, "w5 w6", 8, opts)


@pytest.fixture(scope="module")
def dream_server(folders):
    server = Server(
        folders["dream"], "--block-length", "8", "--max-batch", "1", "--max-queue", "1", "--max-tokens", "16"
    )
    yield server
    server.stop()


@pytest.mark.slow
def test_dream_chat_and_completion_equal_dllm_generate(dream_server, loaded):
    model, tok = loaded["dream"]
    client = client_for(dream_server)
    assert [m.id for m in client.models.list().data] == ["dream"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model="dream", messages=messages, max_tokens=16)
    out = dllm_generate(model, messages, tokenizer=tok, gen_length=16, block_length=8)
    assert chat.choices[0].message.content == out.texts[0] and chat.choices[0].message.role == "assistant"
    stream = list(
        client.chat.completions.create(
            model="dream", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.texts[0]
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == chat.usage.completion_tokens
    comp = client.completions.create(model="dream", prompt="abc def", max_tokens=16)
    alone = dllm_generate(model, "abc def", tokenizer=tok, gen_length=16, block_length=8)
    assert comp.choices[0].text == alone.texts[0]
    assert httpx.get(dream_server.url + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_dream_queue_full_is_429_and_sigterm_drains_in_flight_requests(dream_server, loaded):
    model, tok = loaded["dream"]
    url = dream_server.url + "/v1/completions"
    body = {"prompt": "abc", "max_tokens": 160, "rule": "llada"}  # one token per pass: long enough to overlap
    results = {}

    def post(name):
        results[name] = httpx.post(url, json=body, timeout=120)

    def wait_for(name, value):
        deadline = time.monotonic() + 30
        while dream_server.metric(name) != value and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dream_server.metric(name) == value

    running = threading.Thread(target=post, args=("running",))
    running.start()
    wait_for("dllm_batch_size", 1)
    queued = threading.Thread(target=post, args=("queued",))
    queued.start()
    wait_for("dllm_queue_length", 1)
    full = httpx.post(url, json=body)
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    dream_server.proc.send_signal(signal.SIGTERM)
    running.join(120)
    queued.join(120)
    # uvicorn re-raises the signal once the in-flight requests are done: the status of a SIGTERM exit
    assert dream_server.proc.wait(60) == -signal.SIGTERM
    expected = dllm_generate(model, "abc", tokenizer=tok, gen_length=160, block_length=8, rule="llada").texts[0]
    for name in ("running", "queued"):
        assert results[name].status_code == 200 and results[name].json()["choices"][0]["text"] == expected
    with pytest.raises(httpx.ConnectError):
        httpx.get(dream_server.url + "/health")


def test_cli_serve_dllm_refuses_a_bad_folder_or_option_in_one_line(tmp_path, capsys):
    from pipelines.cli import build_parser, main

    args = build_parser().parse_args(["serve-dllm", str(tmp_path)])
    assert (args.host, args.port, args.rule, args.cache) == ("127.0.0.1", 8000, "localleap", "none")
    assert main(["serve-dllm", str(tmp_path / "missing")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["serve-dllm", str(tmp_path), "--block-length", "0"]) == 2
    assert "block_length must be positive" in capsys.readouterr().err
