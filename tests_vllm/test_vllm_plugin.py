"""The FoPru vLLM plugin on vLLM's CPU build: active in every process, exact at keep=1.0,
FoPru's kept tokens at keep<1, inactive on an unsupported vLLM, clear start-up errors."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_engine
from images import SIZES

from prunecore.budget import keep_count

ACTIVE = re.compile(r"\((\w+)(?:-\d+)? pid=(\d+)\).*prunekit vLLM plugin active")


def image_token_counts(prompt_ids: list[int], image_token_id: int) -> int:
    return sum(1 for t in prompt_ids if t == image_token_id)


def merged_tokens(height: int, width: int) -> int:
    return (height // 28) * (width // 28)  # patch 14, merge 2


def test_plugin_is_active_in_every_process(engines):
    proc, result = engines["keep25"]
    assert result["registered_in_main"] is True
    log = proc.stdout + proc.stderr  # vLLM logs to stdout
    processes = {name for name, _ in ACTIVE.findall(log)}
    assert len({pid for _, pid in ACTIVE.findall(log)}) >= 2
    assert {"EngineCore", "VllmWorker"} <= processes or {"EngineCore", "Worker"} <= processes, log[-3000:]


def test_keep_one_gives_the_same_tokens_as_vllm_without_the_plugin(engines):
    off, keep1 = engines["off"][1], engines["keep1"][1]
    assert keep1["prompt_ids"] == off["prompt_ids"]
    assert keep1["output_ids"] == off["output_ids"]
    assert all(len(ids) == 8 for ids in off["output_ids"])


def test_keep_quarter_gives_the_language_model_keep_count_tokens_per_image(engines, tiny_qwen):
    import json

    image_token_id = json.loads((tiny_qwen / "config.json").read_text())["image_token_id"]
    off, pruned = engines["off"][1], engines["keep25"][1]
    for (h, w), ids_off, ids in zip(SIZES, off["prompt_ids"], pruned["prompt_ids"]):
        n = merged_tokens(h, w)
        assert image_token_counts(ids_off, image_token_id) == n
        assert image_token_counts(ids, image_token_id) == keep_count(n, 0.25)
        assert len(ids_off) - len(ids) == n - keep_count(n, 0.25)
    assert all(len(ids) == 8 for ids in pruned["output_ids"])  # a batch of two sizes generates


def test_kept_indices_equal_tokenprune_fopru_for_the_same_weights_and_image(engines, tiny_qwen):
    import json

    main_python = os.environ.get("PRUNEKIT_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    ref = subprocess.run(
        [main_python, str(ROOT / "tests_vllm" / "fopru_reference.py"), str(tiny_qwen), "0.25"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads(ref.stdout.strip().splitlines()[-1])
    kept = engines["keep25"][1]["kept"]
    assert [len(k) for k in kept] == [keep_count(merged_tokens(h, w), 0.25) for h, w in SIZES]
    assert kept == expected


def test_a_bad_option_stops_start_up_with_one_line_naming_it(tiny_qwen):
    proc = run_engine(tiny_qwen, {"prunekit": {"keep": 2.5}}, timeout=600)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    lines = [ln for ln in log.splitlines() if "prunekit vLLM plugin: keep=2.5" in ln]
    assert lines, log[-3000:]
    assert "pass a fraction in (0, 1]" in lines[0]


def test_an_unsupported_vllm_is_left_untouched_with_one_line(monkeypatch):
    import vllm
    from vllm import ModelRegistry
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    import pipelines.vllm_plugin as plugin

    arch = "Qwen2_5_VLForConditionalGeneration"
    before = (ModelRegistry.models[arch], CPUModelRunner.load_model)
    monkeypatch.setitem(plugin.state, "registered", False)
    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    plugin.logger.addHandler(handler)
    try:
        assert plugin.register() is False
    finally:
        plugin.logger.removeHandler(handler)
    assert (ModelRegistry.models[arch], CPUModelRunner.load_model) == before
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and "inactive: vLLM 0.31.2 is not supported" in messages[0]
    assert "\n" not in messages[0]


def test_register_is_idempotent_and_swaps_the_served_class(monkeypatch):
    from vllm import ModelRegistry
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    import pipelines.vllm_plugin as plugin

    monkeypatch.setitem(plugin.state, "registered", False)
    assert plugin.register() is True
    patched = CPUModelRunner.load_model
    assert plugin.register() is True and CPUModelRunner.load_model is patched
    assert getattr(patched, "prunekit_patched", False)
    cls = ModelRegistry._try_load_model_cls("Qwen2_5_VLForConditionalGeneration")
    assert cls.__name__ == "PrunedQwen2_5_VL"


if __name__ == "__main__":
    sys.exit(pytest.main([str(Path(__file__))]))
