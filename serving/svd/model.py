"""The causal LM that SVD steers. The loader is shared with rl/leed (which must not import
serving/), so it lives in `edgeray.hf_models`; this module only re-exports it for SVD's code."""

from edgeray.hf_models import (CHATML_TEMPLATE, DTYPES, SMOLLM2_GGUF, TINY, build_tiny_model, load_model,
                               resolve_source)

__all__ = ["CHATML_TEMPLATE", "DTYPES", "SMOLLM2_GGUF", "TINY", "build_tiny_model", "load_model", "resolve_source"]
