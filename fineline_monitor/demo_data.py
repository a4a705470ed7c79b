"""The demo's training corpus and tokenizer: real text every machine with Python has.

Where the text comes from: the CPython standard library of the interpreter running the
demo. Three parts, all written by people, none of it probe data:
  - the Python language reference topics (`pydoc_data.topics`, about 0.5 MB of English prose),
  - the docstrings of the standard-library modules, classes and functions (English prose),
  - the source code of the top-level standard-library modules (Python code).
Nothing is downloaded. The tokenizer is a byte-level BPE trained on that corpus at start-up
(a few seconds), so the demo needs no model hub either.
"""

from __future__ import annotations

import ast
import glob
import os
import random
import sysconfig
from pathlib import Path
from typing import List, Tuple

CORPUS_SOURCE = (
    "CPython standard library of this interpreter: pydoc_data.topics (language reference "
    "prose), stdlib docstrings (prose) and stdlib module sources (code)"
)


def load_corpus(max_code_files: int = 120, seed: int = 0) -> List[str]:
    """Documents of the demo corpus, in a fixed order for a given seed."""
    prose, code = load_corpus_domains(max_code_files, seed)
    docs = prose + code
    random.Random(seed).shuffle(docs)
    return docs


def load_corpus_domains(max_code_files: int = 120, seed: int = 0) -> Tuple[List[str], List[str]]:
    """(English prose documents, Python code documents) of the demo corpus: the two domains
    of its training mixture (the `data_mixture` injection drops the prose)."""
    docs: List[str] = []
    import pydoc_data.topics as topics

    docs.extend(v for _, v in sorted(topics.topics.items()) if v.strip())
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(glob.glob(str(lib / "*.py")))
    for path in files:
        try:
            source = Path(path).read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    rng = random.Random(seed)
    code_files = [p for p in files if os.path.getsize(p) < 200_000]
    rng.shuffle(code_files)
    code: List[str] = []
    for path in code_files[:max_code_files]:
        try:
            code.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return docs, code


def train_tokenizer(docs: List[str], vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the corpus, saved as a
    Hugging Face fast tokenizer so the probe scorer treats it like any HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        docs,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok
