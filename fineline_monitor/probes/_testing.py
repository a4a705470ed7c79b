"""A small GPT-2-style model and BPE tokenizer built locally (no hub download), for the
probe tests and benchmarks/probe_speed.py.

The tokenizer is a byte-level BPE trained with `tokenizers` on text of the probe request
files themselves (so it covers their characters); the model is a seeded random init saved
with ``save_pretrained``, loadable by both this package and lm-eval's HFLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List


def corpus(n_lines: int = 3000) -> List[str]:
    from fineline_monitor.probes.tasks import load_task

    texts: List[str] = []
    for name in (
        "hellaswag:rc_5shot",
        "arc_easy:rc_5shot",
        "gsm8k:gold_bpb_5shot",
        "codex_mbpp:gold_bpb_0shot",
        "boolq:rc_0shot",
    ):
        for d in load_task(name).docs[: n_lines // 5]:
            texts.append(d.contexts[0] + d.continuations[0])
    return texts


def build_tiny_model(
    out_dir: str,
    *,
    vocab_size: int = 2048,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
) -> str:
    """Train a BPE tokenizer and save a seeded GPT2LMHeadModel + tokenizer to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=n_positions,
    )
    hf_tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    model = GPT2LMHeadModel(cfg)
    # A random init puts every choice near log(1/V); scale the weights up a little so the
    # logits are far from uniform and argmax / ties are a real test of agreement.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model.save_pretrained(out)
    return str(out)


def cached_tiny_model(**kw) -> str:
    """Build once per machine under $FINELINE_CACHE_DIR (tests call this many times)."""
    base = os.environ.get("FINELINE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fineline_monitor"
    )
    key = "-".join(f"{k}{v}" for k, v in sorted(kw.items())) or "default"
    d = Path(base) / "tiny_models" / key
    if not (d / "config.json").is_file() or not (d / "tokenizer.json").is_file():
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        build_tiny_model(str(tmp), **kw)
        tmp.mkdir(parents=True, exist_ok=True)
        if not d.exists():
            os.replace(tmp, d)
    return str(d)
