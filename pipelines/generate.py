"""One place for the inference-time wrappers around ``generate``.

* LVLMs (the families registered in ``tokenprune.fopru.adapters``): :func:`fopru_generate` and
  the :class:`FoPru` context manager prune visual tokens with FoPru before the language model
  sees them (``tokenprune.fopru``).
* LLMs (Llama/Qwen2/Mistral-style): :func:`ftp_generate` loads a model, attaches FTP token
  routing and generates, returning sparsity and FLOPs stats (``pipelines.generate_llm``).
* Diffusion LLMs (LLaDA, Dream): :func:`dllm_generate` loads a checkpoint folder natively (no
  remote code) or takes a loaded model, decodes with LocalLeap or another parallel commit rule
  and returns text plus NFE / tokens-per-forward stats (``pipelines.generate_dllm``).

Names resolve lazily so importing this module loads no model code.
"""

from prunecore.lazy import lazy_exports

_EXPORTS = {
    "fopru_generate": "tokenprune.fopru",
    "FoPru": "tokenprune.fopru",
    "ftp_generate": "pipelines.generate_llm",
    "load_causal_lm": "pipelines.generate_llm",
    "dllm_generate": "pipelines.generate_dllm",
    "DiffusionGeneration": "pipelines.generate_dllm",
    "DLLMGeneration": "pipelines.generate_dllm",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
