"""Tiny random models, tokenizers, adapters and prompts built in code (no downloads), shared by the tests."""

from __future__ import annotations

import os
import random

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
TASK_WORDS = {
    "math": "add plus minus sum number seven three eight times divide equals digits compute total".split(),
    "poetry": "poem rhyme verse moon love sonnet stanza heart night sorrow rose sing dream".split(),
    "code": "python function return loop variable class import list bug compile def print array".split(),
    "legal": "contract clause court law liability plaintiff statute judge appeal tort lease party".split(),
}
SHARED_WORDS = "the a of and to please write me about with for in on is what how can you".split()
ADAPTER_SPECS = {  # name -> (rank, target modules, alpha)
    "math": (4, ["q_proj", "v_proj"], 8),
    "poetry": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16),
    "code": (2, ["o_proj", "up_proj"], 4),
    "legal": (6, ["k_proj", "down_proj"], 6),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tasks' words; adds <s> at the start (a special token)."""
    words = SPECIAL + sorted({w for ws in TASK_WORDS.values() for w in ws} | set(SHARED_WORDS))
    words += [f"w{i}" for i in range(200 - len(words))]  # filler so the vocab is 200 rows
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_backbone(vocab_size: int = 200, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_backbone(directory: str, seed: int = 0, vocab_size: int = 200) -> str:
    model = make_backbone(vocab_size=vocab_size, seed=seed)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def save_adapter(backbone_dir: str, name: str, directory: str, seed: int) -> str:
    """A LoRA adapter with random (non-zero) A and B, so it really changes outputs."""
    rank, targets, alpha = ADAPTER_SPECS[name]
    base = LlamaForCausalLM.from_pretrained(backbone_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    )
    with torch.no_grad():  # make the delta clearly visible in a tiny random model
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name:
                param.mul_(3.0)
    peft_model.save_pretrained(directory)
    return directory


def make_prompts(name: str, count: int, seed: int) -> list[str]:
    """Prompts of one task: mostly task words, with some shared words."""
    rng = random.Random(f"{name}-{seed}")
    prompts = []
    for _ in range(count):
        length = rng.randint(4, 12)
        words = [rng.choice(TASK_WORDS[name]) if rng.random() < 0.7 else rng.choice(SHARED_WORDS)
                 for _ in range(length)]
        prompts.append(" ".join(words))
    return prompts


def build_assets(root: str, adapter_names=("math", "poetry", "code")) -> dict:
    """Backbone folder, adapter folders and train/test prompts under `root`."""
    backbone_dir = save_backbone(os.path.join(root, "backbone"))
    adapters = {
        name: save_adapter(backbone_dir, name, os.path.join(root, "adapters", name), seed=i + 1)
        for i, name in enumerate(adapter_names)
    }
    train = {name: make_prompts(name, 40, seed=1) for name in adapter_names}
    test = {name: make_prompts(name, 12, seed=2) for name in adapter_names}
    return {"backbone": backbone_dir, "adapters": adapters, "train": train, "test": test}


FAMILY_TARGETS = {  # family -> LoRA target modules of its adapters (fused and Conv1D layers included)
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "up_proj"],  # q/k/v carry biases
    "qwen3": ["q_proj", "o_proj", "gate_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "up_proj"],
    "gemma3": ["q_proj", "v_proj", "down_proj"],
    "phi3": ["qkv_proj", "gate_up_proj"],  # fused projections
    "gpt2": ["c_attn", "c_fc"],  # transformers Conv1D (PEFT: fan_in_fan_out=True)
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],  # fused qkv
}


def make_family_backbone(family: str, vocab_size: int = 200, seed: int = 0):
    """A tiny random causal LM of `family` (2 layers, hidden 64), built in code; token ids 0/1/2 = pad/bos/eos."""
    import transformers as tf

    torch.manual_seed(seed)
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": vocab_size}
    common = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256, **ids}
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=8))
    elif family == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=16, sliding_window=8))
    elif family == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8))
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common))
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids))
    elif family == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, max_position_embeddings=256,
                                                       **ids))
    else:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILY_TARGETS)}")
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_family_adapter(base, family: str, directory: str, seed: int, rank: int = 4) -> str:
    """A LoRA adapter (init_lora_weights=False, scaled up so it clearly changes outputs) on `family`'s targets."""
    from peft import get_peft_model as _get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=FAMILY_TARGETS[family], init_lora_weights=False,
                        fan_in_fan_out=family == "gpt2")
    peft_model = _get_peft_model(base, config)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name:
                param.mul_(3.0)
    peft_model.save_pretrained(directory)
    peft_model.unload()  # restore the plain backbone modules for the next adapter
    return directory


def build_family_assets(root: str, family: str, adapter_names=("math", "poetry", "code")) -> dict:
    """`build_assets` for a tiny random backbone of `family`."""
    backbone_dir = os.path.join(root, "backbone")
    model = make_family_backbone(family)
    model.save_pretrained(backbone_dir)
    make_tokenizer().save_pretrained(backbone_dir)
    adapters = {}
    for i, name in enumerate(adapter_names):
        base = make_family_backbone(family)
        adapters[name] = save_family_adapter(base, family, os.path.join(root, "adapters", name), seed=i + 1,
                                             rank=2 + 2 * i)
    train = {name: make_prompts(name, 40, seed=1) for name in adapter_names}
    test = {name: make_prompts(name, 12, seed=2) for name in adapter_names}
    return {"backbone": backbone_dir, "adapters": adapters, "train": train, "test": test}
