"""The FoPru vLLM plugin on LLaVA-1.5 (CLIP tower, 1-D positions) on vLLM's CPU build: active,
exact at keep=1.0, ``keep_count(576, 0.25)`` tokens per image at keep=0.25 for a batch of two,
and the same kept patches as ``tokenprune.FoPru`` for the same weights and images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HERE, ROOT, engine_result
from tiny_llava import IMAGE_SIZE

from prunecore.budget import keep_count

N_PATCH = (IMAGE_SIZE // 14) ** 2  # 576: every image is cropped to 336 px
SETTINGS = {
    "off": {},
    "keep1": {"prunekit": {"keep": 1.0}},
    "keep25": {"prunekit": {"keep": 0.25}, "kept": True},
}


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    from tiny_llava import write_tiny_llava

    folder = tmp_path_factory.mktemp("llava")
    write_tiny_llava(folder)
    return folder


def llava_run(*args: str, python: str = sys.executable) -> subprocess.Popen:
    """tests_vllm/llava_run.py in a fresh process; vLLM's engine core and worker run inside it
    (one start-up instead of three: the processes are test_vllm_plugin.py's concern)."""
    env = {
        **os.environ,
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [python, str(HERE / "llava_run.py"), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def llava_engines(tiny_llava) -> dict:
    """The three engines run side by side (each in its own processes), then their results."""
    procs = {name: llava_run("engine", str(tiny_llava), json.dumps(opts)) for name, opts in SETTINGS.items()}
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        done[name] = engine_result(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_llava_plugin_is_active_and_keep_one_matches_vllm_without_it(llava_engines):
    off, keep1 = llava_engines["off"], llava_engines["keep1"]
    assert keep1["registered_in_main"] is True
    assert keep1["prompt_ids"] == off["prompt_ids"]
    assert keep1["output_ids"] == off["output_ids"]
    assert all(len(ids) == 8 for ids in off["output_ids"])


def test_llava_keep_quarter_gives_the_language_model_keep_count_tokens_per_image(llava_engines, tiny_llava):
    image_token_id = json.loads((tiny_llava / "config.json").read_text())["image_token_index"]
    off, pruned = llava_engines["off"], llava_engines["keep25"]
    for ids_off, ids in zip(off["prompt_ids"], pruned["prompt_ids"], strict=True):
        assert ids_off.count(image_token_id) == N_PATCH
        assert ids.count(image_token_id) == keep_count(N_PATCH, 0.25)
        assert [t for t in ids if t != image_token_id] == [t for t in ids_off if t != image_token_id]
    assert len(pruned["output_ids"]) == 2 and all(len(ids) == 8 for ids in pruned["output_ids"])


def test_llava_kept_patches_equal_tokenprune_fopru_for_the_same_weights_and_images(llava_engines, tiny_llava):
    main_python = os.environ.get("PRUNEKIT_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    ref = llava_run("reference", str(tiny_llava), "0.25", python=main_python)
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    expected = json.loads(out.strip().splitlines()[-1])
    kept = llava_engines["keep25"]["kept"]
    assert [len(k) for k in kept] == [keep_count(N_PATCH, 0.25)] * 2
    assert kept == expected
    assert kept[0] != kept[1]  # two different images, two different selections


def test_register_swaps_the_served_llava_class(monkeypatch):
    from vllm import ModelRegistry

    import pipelines.vllm_plugin as plugin

    monkeypatch.setitem(plugin.state, "registered", False)
    assert plugin.register() is True
    assert ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration").__name__ == "PrunedLlava"
