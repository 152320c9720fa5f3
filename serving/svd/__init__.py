"""SVD: steering-vector decoding (arXiv 2509.15888) on Ray Serve, behind an OpenAI-compatible API.

Modules, in reading order: `steering` (the per-step math and a transformers LogitsProcessor),
`model` (GGUF / HF / tiny-random loading), `warmstart` (PEFT warm-start, mu_bar calibration,
task persistence), `decoding` (the batched one-pass decode loop and option scoring), `mctasks`
(multiple-choice tasks generated in code), `config` and `app` (the Serve deployment;
`app_builder(args)` builds it). User docs: docs/svd.md.
"""
