"""kiln: build a checkpoint into an engine offline, then generate from it fast.

`from kiln import LLM, SamplingParams` is the offline API. They are imported on first use so that
`import kiln` (e.g. for `kiln --help` or the version) does not pay for importing torch.
"""

from kiln.version import __version__

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

_LAZY = {
    "LLM": "kiln.llm",
    "SamplingParams": "kiln.sampling_params",
    "RequestOutput": "kiln.outputs",
    "CompletionOutput": "kiln.outputs",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
