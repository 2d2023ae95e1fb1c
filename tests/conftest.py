"""Tiny random models for logic tests, built in the test process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

VOCAB = 96


def tiny_model(arch: str = "llama-gqa", seed: int = 0, layers: int = 2, dtype=torch.float32):
    """A 2-layer model with hidden 64 and head_dim 16 of the given family."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=256, head_dim=16, tie_word_embeddings=False)
    if arch == "llama-mha":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common))
    elif arch == "llama-gqa":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
        with torch.no_grad():  # q/k/v biases are zero at init; make them matter
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, **common))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    elif arch == "gemma3":
        # one sliding-window layer (window 6, shorter than the calibration windows) and one global layer,
        # each with its own rotary base: the walk must hand each layer its own inputs
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            num_key_value_heads=2, layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
            sliding_window=6, query_pre_attn_scalar=16, pad_token_id=0, **{**common, "tie_word_embeddings": True}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(-0.5, 0.5)  # Gemma's norms scale by (1 + weight)
    elif arch == "granite":
        model = GraniteForCausalLM(GraniteConfig(num_key_value_heads=2, embedding_multiplier=2.0, residual_multiplier=0.5,
                                                 attention_multiplier=0.3, logits_scaling=2.0, **common))
    elif arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                           **common))
    else:
        raise ValueError(arch)
    # Random init is tiny (std 0.02); widen it so activations fluctuate like a trained model's.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.to(dtype).eval()


def calibration(n: int = 12, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


ARCHS = ["llama-mha", "llama-gqa", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "granite"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in the test on a few sentences (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "Pruning removes heads and channels.",
            "Fluctuation of activations is measured on calibration text."] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_checkpoint(folder, arch: str = "llama-gqa"):
    """Save a tiny random model with a matching tokenizer, as a user's local model folder."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch)
    model.resize_token_embeddings(len(tokenizer))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CLI_TEXT = " ".join(f"Sentence number {i} says that the quick brown fox jumps over the lazy dog." for i in range(300))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama model folder with its tokenizer, as a user's local model."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(CLI_TEXT)
    return p


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_module(path: Path, name: str | None = None):
    """A Python file loaded as a module (benchmark scripts and files outside the package)."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def benchmark_module(stem: str):
    """A script of benchmarks/ (or of benchmarks/studies/) as a module (its `common` helpers importable)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    path = BENCHMARKS / f"{stem}.py"
    return load_module(path if path.is_file() else BENCHMARKS / "studies" / f"{stem}.py", f"bench_{stem}")
