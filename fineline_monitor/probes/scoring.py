"""Scoring (context, continuation) requests with a causal LM: per-token loss of the continuation.

What a request's score is (lm-eval-harness 0.4.x HF backend conventions, so in-loop
numbers equal what it reports on the same checkpoint):

- Encoding: trailing whitespace of the context moves to the continuation; the pair is
  encoded as ``enc(context)`` and ``enc(context + continuation)[len(enc(context)):]``
  (the tokenizer's own special-token behaviour, i.e. a BOS where the tokenizer adds one,
  none when the string already starts with it). An empty context is replaced by the
  prefix token (BOS, else EOS).
- Left truncation: the model reads ``(ctx + cont)[-(max_length + 1):][:-1]``; the last
  ``len(cont)`` positions predict the continuation. Truncated requests are counted.
- Score: sum of log-softmax probabilities of the continuation tokens (fp32), its token
  count, and ``is_greedy`` (argmax equals the token at every continuation position).

How it is computed fast (the same numbers, fewer FLOPs):

1. Shared prefix. All choices of a document usually share the context. The choices'
   input sequences are laid out as a *tree*: the common prefix ("trunk") once, then each
   choice's remaining tokens as a branch that attends to the trunk and to itself only,
   with position ids continuing from the trunk. The trunk stops before the first scored
   position, so every scored position belongs to exactly one choice. (Winogrande, whose
   choices differ inside the context, shares up to the difference; requests truncated
   differently share nothing, as their token positions differ.)
2. Packing. Trees of several documents go into one row with a block-diagonal mask and
   position ids reset per tree; rows are filled longest first, each row's size set by
   its longest tree, and consecutive rows form a batch, so there is almost no padding.
3. Output head on scored positions only. Hugging Face models run their base model to the
   last hidden state; the output embedding and log-softmax are applied only at the
   continuation positions (lm-eval computes a full-vocabulary log-softmax at every
   position). Both 1-2 and 3 are verified once against the model's own plain forward on a
   small input; a model that fails the check (custom masks ignored, a logit soft-cap...)
   falls back to plain right-padded rows / full logits, which are always exact.

Extension point (Megatron, DeepSpeed, your own model): subclass :class:`Scorer` and
implement :meth:`Scorer.score_tokens`. It receives a :class:`TokenBatch` of padded
``input_ids`` [B, T] and ``labels`` [B, T] (the token to predict at each position,
``IGNORE_INDEX`` where nothing is scored) and, when the subclass sets
``supports_packing = True``, ``position_ids`` [B, T] and an additive ``attention_mask``
[B, 1, T, T] (0 where attending is allowed, a large negative number elsewhere). It returns
``(logprobs, is_greedy)``, two 1-D tensors over the scored positions in row-major order
(``labels != IGNORE_INDEX``). Under tensor parallelism this is exactly Megatron's
per-token loss with labels: ``logprobs = -vocab_parallel_cross_entropy(logits, labels)``
on the vocabulary shards, no logit gather; ``is_greedy`` is "the label's logit equals the
max logit", the max taken with one all-reduce(MAX) over the TP group. Everything else
(tokenization, truncation, trees, packing, batching, reduction into request scores) is
done here once for every backend. Also set ``max_length`` and a tokenizer, and override
:meth:`modules` if the model is not a single ``torch.nn.Module``.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fineline_monitor.distributed import module_device

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither config nor tokenizer says
_TOKENIZER_INFINITY = 1_000_000_000_000_000_019_884_624_838_656


class ScoringError(ValueError):
    """A request that cannot be scored (e.g. its continuation is longer than the model's context)."""


class ScoringSelfCheckError(RuntimeError):
    """The model's scores through the fast path disagree with its own plain forward pass.
    Not a setting the user got wrong (so not a ScoringError, which fails at attach time):
    the monitor disables probes and training goes on."""


# ---- tokenization ---------------------------------------------------------------------


class TokenizerAdapter:
    """lm-eval's ``tok_encode`` over a Hugging Face tokenizer or a plain ``str -> list[int]``."""

    def __init__(self, tokenizer: Any, prefix_token_id: Optional[int] = None):
        self.tokenizer = tokenizer
        self.is_hf = (
            hasattr(tokenizer, "encode")
            and hasattr(tokenizer, "decode")
            and not (callable(tokenizer) and not hasattr(tokenizer, "convert_tokens_to_ids"))
        )
        if not self.is_hf and not callable(tokenizer):
            raise TypeError(
                "tokenizer must be a Hugging Face tokenizer or a callable str -> list[int], "
                f"got {type(tokenizer).__name__}"
            )
        self._prefix = prefix_token_id
        if self._prefix is None and self.is_hf:
            bos = getattr(tokenizer, "bos_token_id", None)
            self._prefix = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
        self._prefix_str = None
        if self.is_hf and self._prefix is not None:
            self._prefix_str = tokenizer.decode(self._prefix)

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is None:
            raise ScoringError(
                "a request has an empty context and the tokenizer has no BOS/EOS token to "
                "condition on; pass prefix_token_id"
            )
        return self._prefix

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: Optional[bool] = None
    ) -> List[List[int]]:
        if not self.is_hf:
            return [list(self.tokenizer(t)) for t in texts]
        out: List[Optional[List[int]]] = [None] * len(texts)
        plain: List[int] = []
        for i, t in enumerate(texts):
            # lm-eval: a string already starting with the BOS text gets no extra special tokens.
            if add_special_tokens is None and self._prefix_str and t.startswith(self._prefix_str):
                out[i] = list(self.tokenizer.encode(t, add_special_tokens=False))
            else:
                plain.append(i)
        if plain:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            try:
                enc = self.tokenizer([texts[i] for i in plain], **kw)["input_ids"]
            except Exception:  # noqa: BLE001 - slow/odd tokenizers: one string at a time
                enc = [self.tokenizer.encode(texts[i], **kw) for i in plain]
            for i, ids in zip(plain, enc):
                out[i] = list(ids)
        return out  # type: ignore[return-value]


def encode_pairs(
    tok: TokenizerAdapter, pairs: Sequence[Tuple[str, str]]
) -> List[Tuple[List[int], List[int]]]:
    """lm-eval's ``loglikelihood`` encoding of (context, continuation) pairs, batched."""
    moved: List[Tuple[str, str]] = []
    for ctx, cont in pairs:
        if ctx == "":
            moved.append(("", cont))
            continue
        n = len(ctx) - len(ctx.rstrip())
        if n > 0:
            cont, ctx = ctx[-n:] + cont, ctx[:-n]
        moved.append((ctx, cont))
    # Contexts repeat across choices: encode each distinct string once.
    uniq: Dict[str, int] = {}
    for ctx, cont in moved:
        if ctx:
            uniq.setdefault(ctx, len(uniq))
            uniq.setdefault(ctx + cont, len(uniq))
    strings = list(uniq)
    enc = tok.encode_batch(strings) if strings else []
    empties = [cont for ctx, cont in moved if ctx == ""]
    enc_empty = tok.encode_batch(empties, add_special_tokens=False) if empties else []
    out: List[Tuple[List[int], List[int]]] = []
    k = 0
    for ctx, cont in moved:
        if ctx == "":
            cenc = enc_empty[k]
            k += 1
            if cenc and tok.prefix_token_id != cenc[0]:
                out.append(([tok.prefix_token_id], cenc))
            else:
                out.append((cenc[:1], cenc[1:]))
            continue
        c = enc[uniq[ctx]]
        w = enc[uniq[ctx + cont]]
        out.append((c, w[len(c) :]))
    return out


# ---- the plan: requests -> trees -> packed rows -----------------------------------------


@dataclass
class EncodedRequest:
    index: int  # position in the caller's request list
    group: Any  # requests of one group (a document) may share a prefix
    tokens: List[int]  # model input, already left-truncated: (ctx + cont)[-(L+1):][:-1]
    targets: List[int]  # continuation tokens; predicted by the last len(targets) inputs
    truncated: bool

    @property
    def n_scored(self) -> int:
        return len(self.targets)


@dataclass
class Row:
    """One packed sequence: token ids, positions, tree ids, labels and owners of scored tokens."""

    tokens: List[int] = field(default_factory=list)
    positions: List[int] = field(default_factory=list)
    segment: List[int] = field(default_factory=list)  # tree id inside the row
    branch: List[int] = field(default_factory=list)  # -1 for the shared trunk
    labels: List[int] = field(default_factory=list)
    owners: List[int] = field(
        default_factory=list
    )  # request index of each scored position, in order
    capacity: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


def encode_requests(
    tok: TokenizerAdapter,
    items: Sequence[Tuple[Any, str, str]],
    max_length: int,
    start_index: int = 0,
) -> List[EncodedRequest]:
    """``items`` are (group, context, continuation). Applies lm-eval's truncation rule."""
    pairs = encode_pairs(tok, [(c, x) for _, c, x in items])
    out = []
    for i, ((group, _, _), (cenc, xenc)) in enumerate(zip(items, pairs)):
        if len(cenc) == 0 or len(xenc) == 0:
            raise ScoringError(
                f"request {start_index + i}: the context or continuation encodes to no tokens"
            )
        if len(xenc) > max_length:
            raise ScoringError(
                f"request {start_index + i}: continuation of {len(xenc)} tokens is longer than "
                f"the model's context ({max_length})"
            )
        full = cenc + xenc
        truncated = len(full) > max_length + 1
        full = full[-(max_length + 1) :]
        out.append(
            EncodedRequest(
                index=start_index + i,
                group=group,
                tokens=full[:-1],
                targets=xenc,
                truncated=truncated,
            )
        )
    return out


def _lcp(seqs: List[List[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        m = 0
        while m < n and s[m] == first[m]:
            m += 1
        n = m
    return n


def build_segments(
    reqs: List[EncodedRequest], share_prefix: bool, capacity: int
) -> List[List[Tuple[List[int], List[EncodedRequest]]]]:
    """Trees: for each group, (trunk, [requests]) chunks whose total length fits ``capacity``."""
    groups: Dict[Any, List[EncodedRequest]] = {}
    for r in reqs:
        groups.setdefault(r.group if share_prefix else ("req", r.index), []).append(r)
    segs = []
    for members in groups.values():
        # The trunk ends before the first scored position of every member.
        p = _lcp([m.tokens for m in members]) if len(members) > 1 else len(members[0].tokens)
        p = min([p] + [len(m.tokens) - m.n_scored for m in members])
        trunk = members[0].tokens[:p]
        chunk: List[EncodedRequest] = []
        size = p
        for m in members:
            b = len(m.tokens) - p
            if chunk and size + b > capacity:
                segs.append((trunk, chunk))
                chunk, size = [], p
            chunk.append(m)
            size += b
        segs.append((trunk, chunk))
    return segs


def _segment_len(seg: Tuple[List[int], List[EncodedRequest]]) -> int:
    trunk, members = seg
    return len(trunk) + sum(len(m.tokens) - len(trunk) for m in members)


def pack_rows(
    reqs: List[EncodedRequest],
    *,
    share_prefix: bool,
    pack: bool,
    max_length: int,
    pack_tokens: int = 256,
) -> List[Row]:
    """Trees sorted longest first, first-fit into rows of ``max(longest tree, pack_tokens)``
    tokens. ``pack_tokens`` trades padding and call count against attention cost: a packed
    row of T tokens pays T x T attention (masked entries included), so rows stay short."""
    segs = (
        build_segments(reqs, share_prefix, max_length)
        if share_prefix
        else [(r.tokens[: len(r.tokens) - r.n_scored], [r]) for r in reqs]
    )
    segs.sort(key=lambda s: (-_segment_len(s), s[1][0].index))
    rows: List[Row] = []
    open_rows: List[Row] = []
    for seg in segs:
        n = _segment_len(seg)
        target = None
        if pack:
            # Only the most recent rows are candidates: rows are made longest first, so
            # older rows are nearly full; this keeps packing linear in practice.
            for row in open_rows[-64:]:
                if len(row) + n <= row.capacity:
                    target = row
                    break
        if target is None:
            target = Row(capacity=max(n, min(pack_tokens, max_length)) if pack else n)
            rows.append(target)
            open_rows.append(target)
        _append_segment(target, seg)
        if pack and target.capacity - len(target) < 8:
            open_rows.remove(target)
    return rows


def _append_segment(row: Row, seg: Tuple[List[int], List[EncodedRequest]]) -> None:
    trunk, members = seg
    sid = (row.segment[-1] + 1) if row.segment else 0
    p = len(trunk)
    for j, t in enumerate(trunk):
        row.tokens.append(t)
        row.positions.append(j)
        row.segment.append(sid)
        row.branch.append(-1)
        row.labels.append(IGNORE_INDEX)
    for b, m in enumerate(members):
        first_scored = len(m.tokens) - m.n_scored
        for j in range(p, len(m.tokens)):
            row.tokens.append(m.tokens[j])
            row.positions.append(j)
            row.segment.append(sid)
            row.branch.append(b)
            if j >= first_scored:
                row.labels.append(m.targets[j - first_scored])
                row.owners.append(m.index)
            else:
                row.labels.append(IGNORE_INDEX)


@dataclass
class TokenBatch:
    """What :meth:`Scorer.score_tokens` receives. See the module docstring."""

    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE_INDEX where not scored
    position_ids: Optional[torch.Tensor] = None  # [B, T] long (packing scorers only)
    attention_mask: Optional[torch.Tensor] = (
        None  # [B, 1, T, T] additive float (packing scorers only)
    )
    n_tokens: int = 0  # real (non-padding) tokens in the batch


@dataclass
class PreparedBatch:
    """A batch in compact host form, built once and reused every round (the mask is
    derived on the device from ``segment``/``branch``, T x T never stays in memory)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    owners: np.ndarray  # request index of each scored position, row-major
    n_tokens: int
    allowed: Optional[torch.Tensor] = (
        None  # cached bool [B, T, T] mask when small (see to_token_batch)
    )


def prepare_batches(rows: List[Row], batch_size: int, pad_id: int = 0) -> List[PreparedBatch]:
    rows = sorted(rows, key=lambda r: -len(r))  # longest first: memory errors show on batch one
    out = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k : k + batch_size]
        B, T = len(chunk), max(len(r) for r in chunk)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        seg = (
            torch.arange(T, dtype=torch.long).add(1_000_000).repeat(B, 1)
        )  # padding: attends to itself only
        br = torch.full((B, T), -1, dtype=torch.long)
        for i, r in enumerate(chunk):
            n = len(r)
            ids[i, :n] = torch.tensor(r.tokens, dtype=torch.long)
            labels[i, :n] = torch.tensor(r.labels, dtype=torch.long)
            pos[i, :n] = torch.tensor(r.positions, dtype=torch.long)
            seg[i, :n] = torch.tensor(r.segment, dtype=torch.long)
            br[i, :n] = torch.tensor(r.branch, dtype=torch.long)
        owners = np.array([o for r in chunk for o in r.owners], dtype=np.int64)
        out.append(PreparedBatch(ids, labels, pos, seg, br, owners, sum(len(r) for r in chunk)))
    return out


def to_token_batch(
    pb: PreparedBatch, *, packed: bool, device: Any, mask_dtype: torch.dtype
) -> TokenBatch:
    batch = TokenBatch(
        input_ids=pb.input_ids.to(device, non_blocking=True),
        labels=pb.labels.to(device, non_blocking=True),
        n_tokens=pb.n_tokens,
    )
    if packed:
        if pb.allowed is not None:
            allowed = pb.allowed.to(device, non_blocking=True)
        else:
            T = pb.input_ids.shape[1]
            seg = pb.segment.to(device, non_blocking=True)
            br = pb.branch.to(device, non_blocking=True)
            causal = torch.ones((T, T), dtype=torch.bool, device=device).tril_()
            allowed = (
                (seg[:, :, None] == seg[:, None, :])
                & causal
                & ((br[:, None, :] == -1) | (br[:, :, None] == br[:, None, :]))
            )
            # Rounds reuse their batches: keep small masks (<= 16 MiB each) on the host.
            if allowed.numel() <= (16 << 20):
                pb.allowed = allowed.to("cpu")
        if mask_dtype == torch.bool:
            mask = allowed  # SDPA takes a boolean "may attend" mask as is
        else:
            mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)
        batch.position_ids = pb.positions.to(device, non_blocking=True)
        batch.attention_mask = mask[:, None]
    return batch


def collate(
    rows: List[Row], *, packed: bool, device: Any, mask_dtype: torch.dtype = torch.float32
) -> TokenBatch:
    """One TokenBatch from rows (tests and the self-check)."""
    (pb,) = prepare_batches(rows, len(rows))
    return to_token_batch(pb, packed=packed, device=device, mask_dtype=mask_dtype)


# ---- scorers ---------------------------------------------------------------------------


class Scorer(abc.ABC):
    """Turns token rows into per-token log-probabilities. Subclass and implement
    :meth:`score_tokens` (see the module docstring for the contract)."""

    #: whether score_tokens honours position_ids and a custom attention mask (trees, packing)
    supports_packing: bool = False
    #: target length of a packed row (see pack_rows)
    pack_tokens: int = 256

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        *,
        prefix_token_id: Optional[int] = None,
        device: Any = None,
        mask_dtype: torch.dtype = torch.float32,
    ):
        self.tok = (
            tokenizer
            if isinstance(tokenizer, TokenizerAdapter)
            else TokenizerAdapter(tokenizer, prefix_token_id)
        )
        if max_length is None or int(max_length) < 2:
            raise ScoringError(f"max_length must be >= 2, got {max_length!r}")
        self.max_length = int(max_length)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mask_dtype = mask_dtype

    @abc.abstractmethod
    def score_tokens(self, batch: TokenBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (logprobs, is_greedy) over positions with ``labels != IGNORE_INDEX``, row-major."""

    def modules(self) -> List[torch.nn.Module]:
        """Modules whose train/eval mode a probe round switches to eval and restores."""
        return []

    def prepare(self) -> None:  # noqa: B027 - an optional hook: most scorers need nothing here
        """Called once (inside a probe round's protection) before the first batch."""

    # -- driver -------------------------------------------------------------------------
    def encode(
        self, items: Sequence[Tuple[Any, str, str]], start_index: int = 0
    ) -> List[EncodedRequest]:
        return encode_requests(self.tok, items, self.max_length, start_index)

    def plan(self, reqs: List[EncodedRequest]) -> List[Row]:
        self.prepare()
        packing = self.supports_packing
        return pack_rows(
            reqs,
            share_prefix=packing,
            pack=packing,
            max_length=self.max_length,
            pack_tokens=self.pack_tokens,
        )

    def score_rows(
        self, rows: List[Row], batch_size: int, progress: Optional[Callable[[int], None]] = None
    ) -> Dict[int, Tuple[float, int, bool]]:
        """Score rows; returns request index -> (sum logprob, n_tokens, is_greedy)."""
        return self.score_batches(prepare_batches(rows, batch_size), progress)

    def score_batches(
        self, batches: List[PreparedBatch], progress: Optional[Callable[[int], None]] = None
    ) -> Dict[int, Tuple[float, int, bool]]:
        self.prepare()
        owners_all, lp_all, gr_all = [], [], []
        for pb in batches:
            batch = to_token_batch(
                pb, packed=self.supports_packing, device=self.device, mask_dtype=self.mask_dtype
            )
            lp, gr = self.score_tokens(batch)
            if lp.shape[0] != len(pb.owners):
                raise RuntimeError(
                    f"score_tokens returned {lp.shape[0]} values for {len(pb.owners)} scored tokens"
                )
            owners_all.append(pb.owners)
            lp_all.append(lp.detach().to("cpu", torch.float64).numpy())
            gr_all.append(gr.detach().to("cpu").numpy().astype(bool))
            if progress is not None:
                progress(len(np.unique(pb.owners)))
        if not owners_all:
            return {}
        owners = np.concatenate(owners_all)
        lps = np.concatenate(lp_all)
        grs = np.concatenate(gr_all)
        keys, inv = np.unique(owners, return_inverse=True)
        sums = np.bincount(inv, weights=lps, minlength=len(keys))
        counts = np.bincount(inv, minlength=len(keys))
        misses = np.bincount(inv, weights=(~grs).astype(np.float64), minlength=len(keys))
        return {
            int(k): (float(s_), int(c), bool(m == 0))
            for k, s_, c, m in zip(keys, sums, counts, misses)
        }


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the model returned {type(out).__name__}; expected logits or an object with .logits"
    )


def _score_logits(
    logits_sel: torch.Tensor, targets: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    logits_sel = logits_sel.float()
    lp = F.log_softmax(logits_sel, dim=-1).gather(1, targets[:, None])[:, 0]
    return lp, logits_sel.argmax(dim=-1) == targets


class TorchScorer(Scorer):
    """A plain ``torch.nn.Module`` mapping input_ids [B, T] to logits (or ``.logits``).
    No custom masks: one request per right-padded row (exact for any causal model)."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, max_length: Optional[int] = None, **kw: Any
    ):
        self.model = model
        if not max_length:
            max_length = _model_max_length(model, tokenizer)
        if not max_length:
            raise ScoringError("cannot tell the model's context length: set probes.max_length")
        super().__init__(
            tokenizer, max_length, device=kw.pop("device", None) or _model_device(model), **kw
        )

    def modules(self) -> List[torch.nn.Module]:
        return [self.model]

    def score_tokens(self, batch: TokenBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = _logits_of(self.model(batch.input_ids))
        sel = batch.labels != IGNORE_INDEX
        return _score_logits(logits[sel], batch.labels[sel])


class HFScorer(Scorer):
    """A Hugging Face causal LM (``AutoModelForCausalLM``-like): trees, packing and the
    output head on scored positions only, each verified once on the model itself."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_length: Optional[int] = None,
        *,
        device: Any = None,
        verify: bool = True,
        **kw: Any,
    ):
        self.model = model
        if not max_length:
            max_length = _model_max_length(model, tokenizer) or DEFAULT_MAX_LENGTH
        dtype = next(model.parameters()).dtype
        super().__init__(
            tokenizer,
            max_length,
            device=device or _model_device(model),
            mask_dtype=dtype if dtype.is_floating_point else torch.float32,
            **kw,
        )
        base = getattr(model, "base_model", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._base = base if (base is not None and base is not model and head is not None) else None
        self._head = head
        self.fast_head = self._base is not None
        self.supports_packing = _accepts(model, "position_ids") and _accepts(
            model, "attention_mask"
        )
        self._verify = verify
        self._verified = not verify
        self.check_report: Dict[str, Any] = {}

    def modules(self) -> List[torch.nn.Module]:
        return [self.model]

    # -- the self-check: packed + fast head vs the model's plain forward -------------------
    def prepare(self) -> None:
        if self._verified:
            return
        self._verified = True
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 50)
        g = torch.Generator().manual_seed(0)  # a private generator: no global RNG is touched
        n = min(12, self.max_length)
        a = torch.randint(0, min(vocab, 1000), (n,), generator=g).tolist()
        b = a[: n // 2] + torch.randint(0, min(vocab, 1000), (n - n // 2,), generator=g).tolist()
        c = torch.randint(0, min(vocab, 1000), (max(3, n // 3),), generator=g).tolist()
        reqs = [
            EncodedRequest(0, "x", a[:-1], a[-3:], False),
            EncodedRequest(1, "x", b[:-1], b[-3:], False),
            EncodedRequest(2, "y", c[:-1], c[-2:], False),
        ]
        ref = {}
        # eval mode (no dropout) and every RNG stream restored: the check changes nothing.
        with preserved_state([self.model]), torch.inference_mode():
            for r in reqs:
                ids = torch.tensor([r.tokens], device=self.device)
                logits = _logits_of(self.model(input_ids=ids))[0, -r.n_scored :]
                lp, _ = _score_logits(logits, torch.tensor(r.targets, device=self.device))
                ref[r.index] = float(lp.double().sum())
            float_mask = self.mask_dtype
            tol = 1e-3 if float_mask == torch.float32 else 5e-2
            sdpa = (
                getattr(getattr(self.model, "config", None), "_attn_implementation", None) == "sdpa"
            )
            plans = [(self.supports_packing, self.fast_head, torch.bool)] if sdpa else []
            plans += [
                (self.supports_packing, self.fast_head, float_mask),
                (self.supports_packing, False, float_mask),
                (False, self.fast_head, float_mask),
                (False, False, float_mask),
            ]
            for packing, fast, mdt in plans:
                self.supports_packing, self.fast_head, self.mask_dtype = packing, fast, mdt
                try:
                    err = 0.0
                    # Two layouts: one row per document (rows of different lengths: padding)
                    # and all documents packed into one row.
                    for pt in (1, self.max_length):
                        rows = pack_rows(
                            reqs,
                            share_prefix=packing,
                            pack=packing,
                            max_length=self.max_length,
                            pack_tokens=pt,
                        )
                        batch = collate(
                            rows, packed=packing, device=self.device, mask_dtype=self.mask_dtype
                        )
                        lp, _ = self.score_tokens(batch)
                        owners = [o for r in sorted(rows, key=lambda r: -len(r)) for o in r.owners]
                        got: Dict[int, float] = {}
                        for o, v in zip(owners, lp.double().cpu().tolist()):
                            got[o] = got.get(o, 0.0) + v
                        err = max([err] + [abs(got[k] - ref[k]) for k in ref])
                except Exception as e:  # noqa: BLE001 - a model without these features falls back
                    err = float("inf")
                    self.check_report.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
                self.check_report[
                    f"packing={packing},fast_head={fast},mask={str(mdt).replace('torch.', '')}"
                ] = err
                if err <= tol:
                    return
        raise ScoringSelfCheckError(
            f"the model's scores disagree with its own forward pass: {self.check_report}"
        )

    def score_tokens(self, batch: TokenBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        kw: Dict[str, Any] = {"use_cache": False}
        if self.supports_packing:
            kw.update(position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        sel = batch.labels != IGNORE_INDEX
        if self.fast_head:
            out = self._base(input_ids=batch.input_ids, **kw)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            logits = self._head(hidden[sel])
        else:
            logits = _logits_of(self.model(input_ids=batch.input_ids, **kw))[sel]
        return _score_logits(logits, batch.labels[sel])


@contextlib.contextmanager
def preserved_state(modules: Sequence[torch.nn.Module]):
    """eval() inside; afterwards every submodule's mode and every RNG stream as before."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    modes = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# ---- helpers --------------------------------------------------------------------------


def _accepts(model: Any, name: str) -> bool:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return False
    return name in sig.parameters


def _model_device(model: Any) -> torch.device:
    return module_device(model) or torch.device("cpu")


def _model_max_length(model: Any, tokenizer: Any) -> Optional[int]:
    """lm-eval's resolve_max_length: config n_positions / max_position_embeddings / n_ctx,
    then the tokenizer's model_max_length; plain modules may carry ``max_length``."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(model, "max_length", None)
    if isinstance(v, int) and v > 0:
        return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < _TOKENIZER_INFINITY:
        return v
    return None


def is_hf_causal_lm(model: Any) -> bool:
    return (
        hasattr(model, "config")
        and hasattr(model, "get_output_embeddings")
        and hasattr(model, "base_model")
    )


def build_scorer(
    model: Any,
    tokenizer: Any,
    max_length: int = 0,
    *,
    device: Any = None,
    prefix_token_id: Optional[int] = None,
) -> Scorer:
    """The right built-in scorer for ``model``: HFScorer for Hugging Face causal LMs,
    TorchScorer for other modules."""
    if model is None:
        raise ScoringError("probes need a model (or a pre-built scorer)")
    if tokenizer is None:
        raise ScoringError(
            "probes need a tokenizer: pass tokenizer= (a Hugging Face tokenizer or a "
            "callable str -> list[int]) to FineLineMonitor"
        )
    if is_hf_causal_lm(model):
        return HFScorer(
            model, tokenizer, max_length or None, device=device, prefix_token_id=prefix_token_id
        )
    return TorchScorer(
        model, tokenizer, max_length or None, device=device, prefix_token_id=prefix_token_id
    )
