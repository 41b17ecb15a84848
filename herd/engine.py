"""The generation engine: KV cache, sampling, batched prefill and decode, continuous batching. Token ids only.

- KVCache preallocates per-layer buffers. For Llama 4 the layout is hybrid: a chunked-attention layer can only ever
  see keys of the current `attn_chunk_size` chunk, so it keeps a ring of one chunk; NoPE (global) layers keep all.
- Engine admits requests into free cache rows between decode steps (continuous batching): waiting prompts are
  prefilled together, right-padded (padding has position -1 and is never written), in pieces of `prefill_chunk`
  tokens so activation memory does not grow with the prompt; then one batched decode step runs every active row.
- Sampling (sampling.py) is a pure function of (logits, per-row parameters, per-row generators).
- `generate_reference` is the naive no-cache loop the engine is tested against.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .ops import QuantizedKV, quantize_kv
from .prefix_cache import PrefixCache
from .sampling import apply_penalties, argmax_rows, sample


# Scoring a prompt (prompt_logprobs) needs the logits of every prompt position, (B, piece, V) fp32: prefill pieces
# are shortened so that one piece's logits stay under this many bytes.
SCORING_LOGITS_BYTES = 256 << 20
# The fewest prompt tokens a step prefills while others decode (so a prompt always advances); by default a step's
# prefill may take PREFILL_SHARE times a decode step's time (so a running stream's time between tokens grows at most
# ~1 + PREFILL_SHARE times while prompts prefill: the bound is 3x); the weight of the newest measurement in
# the engine's moving averages of step times. The floor was 16, above what the budget gives beside 8 decoding
# SmolLM2 streams (~14 on Zen 2, 2 threads); at 8 the budget decides: `python -m bench.serve_batching`, herd alone,
# 16 clients ITL p95 88.9 -> 69.6 ms and TTFT p50 217 -> 149 ms, aggregate 316 -> 313 tok/s; the 2000-token prompt's
# streams' ITL p99 during its prefill 97 -> 84 ms, the prefill 9.1 -> 9.5 s.
MIN_PREFILL_PIECE = 8
PREFILL_SHARE = 2.0
AVERAGE_WEIGHT = 0.2


class ContextLengthError(ValueError):
    """A prompt that does not fit the context window; the message gives the limits."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # HF-style: divides positive logits of tokens seen in prompt or output
    presence_penalty: float = 0.0     # OpenAI-style, on tokens already generated
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # None: none; 0: the chosen token's; n: also the top n
    prompt_logprobs: int | None = None   # the same for each prompt token given those before it (scoring)

    def validate(self):
        scoring = self.prompt_logprobs is not None
        checks = [(self.max_tokens >= (0 if scoring else 1),
                   "max_tokens must be >= 1 (0 only to score a prompt: with prompt_logprobs)"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
                  (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
                  (not scoring or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


# ---- KV cache -----------------------------------------------------------------------------------------------------
class KVCache:
    """Per-layer key/value buffers (B, S, K, D) and the absolute position held in each slot (B, S), -1 = empty.

    Chunked layers: S = attn_chunk_size, slot = pos % S (a ring; older chunks are invisible anyway).
    Global layers: S = max_seq_len, slot = pos. `rows` selects the cache rows of the current forward: a slice (views,
    no copies; decode, and prefill of consecutive rows) or an index tensor.
    kv_int8: global layers store int8 keys and values with one scale per token and head (ops.QuantizedKV); attention
    dequantizes them one key block at a time. Chunked layers stay in `dtype`. plan.kv_cache_bytes gives nbytes().
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int, dtype=torch.float32, device="cpu",
                 kv_int8: bool = False):
        self.max_seq_len, self.dtype, self.kv_int8 = max_seq_len, dtype, kv_int8
        self.k, self.v, self.pos, self.ring = [], [], [], []
        for spec in cfg.layers:
            ring = spec.chunked and cfg.attn_chunk_size < max_seq_len
            S = cfg.attn_chunk_size if ring else max_seq_len
            shape = (batch_size, S, cfg.n_kv_heads, cfg.head_dim)
            for bufs in (self.k, self.v):
                if kv_int8 and not spec.chunked:
                    bufs.append(QuantizedKV(torch.zeros(shape, dtype=torch.int8, device=device),
                                            torch.zeros(*shape[:3], 1, dtype=torch.float32, device=device)))
                else:
                    bufs.append(torch.zeros(shape, dtype=dtype, device=device))
            self.pos.append(torch.full((batch_size, S), -1, dtype=torch.long, device=device))
            self.ring.append(ring)
        self.rows: slice | torch.Tensor = slice(None)
        self._slots_memo = None      # decode_slots': (pos, rows, {layer kind: per-row tensors})
        self._row_views: dict = {}   # decode_slot's: (layer, row, inference mode) -> that row's k, v, pos views

    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds (keys, values, int8 scales, slot positions)."""
        tensors = [t for x in (*self.k, *self.v)
                   for t in ((x.values, x.scale) if isinstance(x, QuantizedKV) else (x,))]
        return sum(t.numel() * t.element_size() for t in (*tensors, *self.pos))

    def reset(self, row: int):
        for p in self.pos:
            p[row] = -1

    def read_positions(self, row: int, start: int, n: int):
        """Copies of the keys and values of positions start .. start+n-1 in cache row `row`, per layer (n, K, D):
        ([k per layer], [v per layer]); None when a layer no longer holds all of them (a ring overwrote some) or
        keys are int8."""
        positions = torch.arange(start, start + n, device=self.pos[0].device)
        keys, values = [], []
        for layer, (kb, vb, pb) in enumerate(zip(self.k, self.v, self.pos)):
            if isinstance(kb, QuantizedKV) or (start + n > kb.shape[1] and not self.ring[layer]):
                return None
            slots = positions % kb.shape[1]
            if not torch.equal(pb[row, slots], positions):
                return None
            keys.append(kb[row, slots])
            values.append(vb[row, slots])
        return keys, values

    def write_positions(self, row: int, start: int, keys: list, values: list):
        """Store keys and values (per layer (n, K, D), as read_positions returns them) of positions start ..
        start+n-1 into cache row `row`, as prefilling them would: a ring keeps the last of them in their slots."""
        n = keys[0].shape[0]
        positions = torch.arange(start, start + n, device=self.pos[0].device)
        for layer, (kb, vb, pb) in enumerate(zip(self.k, self.v, self.pos)):
            S = kb.shape[1]
            if not self.ring[layer] and start + n > S:
                raise ContextLengthError(f"position {start + n - 1} is past the cache's {S} slots")
            keep = slice(max(0, n - S), n)                  # a ring: only the last S positions survive
            slots = positions[keep] % S
            kb[row, slots], vb[row, slots], pb[row, slots] = keys[layer][keep], values[layer][keep], positions[keep]

    def _row_ids(self, B):
        if isinstance(self.rows, slice):
            start = self.rows.start or 0
            return torch.arange(start, start + B, device=self.pos[0].device)
        return self.rows

    def update(self, layer: int, k, v, pos):
        """Store this step's k, v (B, T, K, D) at positions pos (B, T); return every key the step may attend to,
        with their positions: (k_all, v_all, pos_all)."""
        kb, vb, pb = self.k[layer], self.v[layer], self.pos[layer]
        if not isinstance(kb, QuantizedKV):   # a cache in another dtype than the activations (Engine(cache_dtype=)):
            k, v = k.to(kb.dtype), v.to(vb.dtype)          # rounded once, and attended as stored
        p = int(pos) if pos.numel() == 1 else -1
        one = self.decode_slot(layer, p) if p >= 0 else None
        if one is not None:         # batch-1 decode: three slot writes, no masks, index tensors or host checks
            k_row, v_row, pos_row, slot, n = one
            k_row[slot].copy_(k[0, 0])
            v_row[slot].copy_(v[0, 0])
            pos_row[slot] = p
            return k_row[None, :n], v_row[None, :n], pos_row[None, :n]
        S, T = kb.shape[1], pos.shape[1]
        row_ids = self._row_ids(pos.shape[0])
        valid = pos >= 0
        if self.ring[layer] and T > 1:
            # Several new tokens on a ring: writing first could overwrite keys an earlier query of this step still
            # needs, so attend over (old keys + new keys) and write afterwards. Only each row's last S new tokens
            # can still matter later. The old keys any query here can see are those of the chunk of the row's first
            # new token before it, i.e. slots 0 .. first % S - 1: attend over just those, not the whole ring.
            first = pos.masked_fill(~valid, torch.iinfo(pos.dtype).max).min(dim=1).values       # (B,)
            n_old = int((first[valid.any(dim=1)] % S).max()) if valid.any() else 0
            k_all = torch.cat([kb[self.rows, :n_old], k], dim=1)
            v_all = torch.cat([vb[self.rows, :n_old], v], dim=1)
            pos_all = torch.cat([pb[self.rows, :n_old], pos], dim=1)
            last = pos.max(dim=1, keepdim=True).values
            keep = valid & (pos > last - S)
            b, t = keep.nonzero(as_tuple=True)
            slots = pos[b, t] % S
            kb[row_ids[b], slots], vb[row_ids[b], slots], pb[row_ids[b], slots] = k[b, t], v[b, t], pos[b, t]
            return k_all, v_all, pos_all
        if isinstance(self.rows, slice) and not isinstance(kb, QuantizedKV) and bool(valid.all()):
            return self._update_dense(layer, k, v, pos)
        b, t = valid.nonzero(as_tuple=True)
        p = pos[b, t]
        if not self.ring[layer] and p.numel() and int(p.max()) >= S:
            raise ContextLengthError(f"position {int(p.max())} is past the cache's {S} slots")
        slots = p % S
        if isinstance(kb, QuantizedKV):
            for buf, x in ((kb, quantize_kv(k[b, t])), (vb, quantize_kv(v[b, t]))):
                buf.values[row_ids[b], slots], buf.scale[row_ids[b], slots] = x.values, x.scale
        else:
            kb[row_ids[b], slots], vb[row_ids[b], slots] = k[b, t], v[b, t]
        pb[row_ids[b], slots] = p
        if self.ring[layer]:
            return kb[self.rows], vb[self.rows], pb[self.rows]
        filled = int(pos.max()) + 1       # global layers: attend only over the slots in use
        return kb[self.rows, :filled], vb[self.rows, :filled], pb[self.rows, :filled]

    def decode_slot(self, layer: int, p: int):
        """Where one token at position p in the cache's only row (a batch-1 decode step) goes: (k, v (S, K, D), pos
        (S,) of that row, its slot, how many slots from 0 attention reads). `update` writes the slot itself;
        decode.HerdBlock has its C++ layer write it. None when the rows are not a single slice row or keys are int8."""
        kb, row = self.k[layer], self._single_row()
        if type(kb) is not torch.Tensor or row is None:
            return None
        slot, reads = _slots_and_reads(p, p, self.ring[layer], kb.shape[1])
        # The row's views, made once per layer: three index ops cost ~5 us, ~0.15 ms of a 30-layer step. Kept apart
        # by inference mode: a view made inside it cannot take in-place writes of tracked values outside it.
        key = (layer, row, torch.is_inference_mode_enabled())
        views = self._row_views.get(key)
        if views is None:
            views = self._row_views[key] = (kb[row], self.v[layer][row], self.pos[layer][row])
        return (*views, slot, reads)

    def decode_slot_all(self, p: int):
        """decode_slot for every layer at once (decode.HerdTransformer's one call per step): lists, one item per
        layer, of the row's k, v and pos views, the slots and the slot counts; None where decode_slot would be for
        any layer. The views are kept per row and inference mode, as decode_slot's."""
        row = self._single_row()
        if row is None or any(type(kb) is not torch.Tensor for kb in self.k):
            return None
        slots, reads = zip(*(_slots_and_reads(p, p, ring, kb.shape[1]) for ring, kb in zip(self.ring, self.k)))
        key = ("all", row, torch.is_inference_mode_enabled())
        views = self._row_views.get(key)
        if views is None:
            views = self._row_views[key] = ([kb[row] for kb in self.k], [vb[row] for vb in self.v],
                                             [pb[row] for pb in self.pos])
        return (*views, list(slots), list(reads))

    def _single_row(self) -> int | None:
        """The cache row of a batch-1 step (rows a slice of one row), else None."""
        rows = self.rows
        if not isinstance(rows, slice) or (rows.stop or 0) - (rows.start or 0) != 1:
            return None
        return rows.start or 0

    def decode_slots(self, layer: int, pos):
        """Where a decode step's tokens go, one per row of `rows` at positions pos (B, 1): (k, v (R, S, K, D) and pos
        (R, S), the layer's whole buffers; then per row, int64 (B,) each: its cache row, its slot, how many slots from
        0 attention reads). `update` writes slots itself; decode.HerdBlock has its C++ layer (decode_layer_rows) write
        them. None when keys are int8 or a row is padding (position < 0)."""
        return self._step_slots(layer, pos, self._row_slots)

    def piece_slots(self, layer: int, pos):
        """decode_slots for a piece of one sequence, T new tokens at consecutive positions pos (1, T) in the cache's
        only row: that row T times, one slot per token. decode_layer_rows writes every token's key before any token
        attends, and a key counts only for queries at its position or later, so each token sees its causal prefix.
        None when decode_slots would be, the rows are not one, or on a ring layer the piece leaves its chunk (a later
        token's slot would hold a key an earlier token of the piece still reads)."""
        return self._step_slots(layer, pos, self._piece_slots)

    def _step_slots(self, layer: int, pos, per_row_of):
        """(the layer's buffers, *per_row_of(pos, ring, S)) or None. Every layer of a step gets the same positions
        and rows, and the per-row tensors depend only on the layer's kind (ring or not, S): computed once per kind and
        step (~10 us of torch ops per layer otherwise). Compared by value (copies kept): inference tensors have no
        version counter to tell in-place changes."""
        kb = self.k[layer]
        if type(kb) is not torch.Tensor:
            return None
        memo = self._slots_memo
        if memo is None or not (_same(memo[0], pos) and _same(memo[1], self.rows)):
            memo = self._slots_memo = (pos.clone(), self.rows.clone() if torch.is_tensor(self.rows) else self.rows,
                                       {})
        kind = (per_row_of.__name__, self.ring[layer], kb.shape[1])
        if kind not in memo[2]:
            memo[2][kind] = per_row_of(pos, *kind[1:])
        per_row = memo[2][kind]
        return None if per_row is None else (kb, self.v[layer], self.pos[layer], *per_row)

    def _row_slots(self, pos, ring: bool, S: int):
        """decode_slots' per-row tensors (cache rows, slots, slots read) for positions pos (B, 1) in layers of this
        kind, or None when a position is padding."""
        p = pos.reshape(-1)                                                # (B,)
        lowest, highest = torch.aminmax(p)
        if int(lowest) < 0:
            return None
        return (self._row_ids(p.shape[0]).long().contiguous(), *_slots_and_reads(p, int(highest), ring, S))

    def _piece_slots(self, pos, ring: bool, S: int):
        """piece_slots' per-row tensors for positions pos (1, T), or None (see piece_slots)."""
        rows, p = self.rows, pos.reshape(-1)                               # (T,)
        n_rows = (rows.stop or 0) - (rows.start or 0) if isinstance(rows, slice) else rows.numel()
        row = self._row_ids(1)
        first, last = int(p[0]), int(p[-1])
        if (pos.shape[0] != 1 or n_rows != 1 or first < 0
                or not torch.equal(p, torch.arange(first, first + p.numel(), device=p.device))
                or (ring and first // S != last // S)):
            return None
        return (row.long().expand(p.numel()).contiguous(), *_slots_and_reads(p, last, ring, S))

    def _update_dense(self, layer: int, k, v, pos):
        """`update` when every new token is real (no padding) and the rows are a slice: a single prompt's prefill,
        batched decode. The slots are written in place through views with one scatter per buffer, instead of
        nonzero + gathers + index_put (a dozen small ops per layer per decoded token). k and v arrive in the cache's
        dtype (update casts them)."""
        kb, vb, pb = self.k[layer], self.v[layer], self.pos[layer]
        S = kb.shape[1]
        top = int(pos.max())
        if not self.ring[layer] and top >= S:
            raise ContextLengthError(f"position {top} is past the cache's {S} slots")
        slots = pos % S                                                    # (B, T); T == 1 on rings (see update)
        index = slots[:, :, None, None].expand_as(k)                       # (B, T, K, D)
        kb[self.rows].scatter_(1, index, k)
        vb[self.rows].scatter_(1, index, v)
        pb[self.rows].scatter_(1, slots, pos)
        if self.ring[layer]:
            return kb[self.rows], vb[self.rows], pb[self.rows]
        return kb[self.rows, :top + 1], vb[self.rows, :top + 1], pb[self.rows, :top + 1]


def _slots_and_reads(p, highest: int, ring: bool, S: int):
    """(slot, slots read from 0) of positions p >= 0 (a tensor (n,), or one int), the largest `highest`, in a layer of
    this kind (ring or not, S slots); past a global layer's slots: ContextLengthError."""
    if not ring and highest >= S:
        raise ContextLengthError(f"position {highest} is past the cache's {S} slots")
    if not ring:
        return p % S, p + 1
    return p % S, torch.full_like(p, S) if torch.is_tensor(p) else S


def _same(a, b) -> bool:
    """Two cache-row selections or position tensors with the same values (a slice, or a tensor)."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and torch.equal(a, b)
    return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


# ---- requests and the engine ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    id: int = 0
    output: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)   # per output token: {"logprob", "top": [(id, lp), ...]}
    prompt_logprobs: list[dict | None] = field(default_factory=list)   # the same per prompt token; None for the first
    row: int | None = None
    finish_reason: str | None = None   # "stop" (eos / stop token / stop string), "length", "cancelled"
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None   # (V,) generated-token counts, for the penalties
    seen: torch.Tensor | None = None     # (V,) bool, prompt or generated
    images: torch.Tensor | None = None   # pixel values for the prompt's image patch tokens, until admitted
    embeddings: torch.Tensor | None = None   # (1, T, dim) input rows of a prompt with images, until prefilled
    prefilled: int = 0                   # prompt tokens whose keys and values are in the cache row
    prefix_len: int | None = 0           # prompt tokens in the prefix cache through prefix_block (None: no more)
    prefix_block: object | None = None   # the prefix cache's last block of this prompt
    # Optional per-request constraint (grammar-constrained decoding, herd/constrain.py): `mask(logits)` sets the
    # logits (V,) of forbidden tokens to -inf in place before sampling; `accept(token_id)` advances its state.
    constraint: object | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous batching over one model. `add` queues a request; each `step` admits waiting requests into free
    cache rows, runs one prefill piece for the requests still prefilling and one decode step for every request
    past its prompt, and returns the (request, token id) pairs it produced. Not thread-safe: one thread drives it.

    Prefill is chunked and interleaved with decoding so that a long prompt cannot stall the running streams: while
    any request decodes, a step prefills at most a budget of prompt tokens (`step_tokens` minus the decoding rows,
    or by default as many as take PREFILL_SHARE decode steps' time, from the measured speeds), so a running stream's
    time between tokens grows at most ~3x while a prompt prefills; with nothing decoding, every prefilling row takes
    a piece of `prefill_chunk` tokens per step. Prompts starting with a prefix already prefilled reuse its keys and
    values from the prefix cache (prefix_cache.py; `prefix_cache_mib` 0 turns it off)."""

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 cache_dtype=None, kv_int8: bool = False, step_tokens: int | None = None,
                 prefix_cache_mib: float = 256, prefix_block: int = 32):
        self.model = model
        self.cfg: ModelConfig = model.config
        self.max_seq_len = min(max_seq_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        if prefill_chunk < 1 or (step_tokens is not None and step_tokens < 1) or prefix_cache_mib < 0:
            raise ValueError(f"prefill_chunk and step_tokens must be >= 1 and prefix_cache_mib >= 0; got "
                             f"{prefill_chunk}, {step_tokens}, {prefix_cache_mib}")
        self.prefill_chunk, self.step_tokens = prefill_chunk, step_tokens
        p = next(model.parameters())
        self.device = p.device
        self.cache = KVCache(self.cfg, max_batch, self.max_seq_len, cache_dtype or self._activation_dtype(p),
                             p.device, kv_int8=kv_int8)
        # int8 keys are quantized per token as written; cached blocks would have to carry their scales: not kept
        self.prefix_cache = (PrefixCache(prefix_block, int(prefix_cache_mib * (1 << 20)))
                             if prefix_cache_mib > 0 and not kv_int8 else None)
        self.max_batch = max_batch
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._ids = itertools.count()
        self._decode_seconds: float | None = None      # moving averages: one decode step's time,
        self._prefill_rate: float | None = None        # prefill tokens per second

    @staticmethod
    def _activation_dtype(p):
        return p.dtype if p.is_floating_point() else torch.bfloat16

    # -- requests -------------------------------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams | None = None, constraint=None, images=None) -> Request:
        """Queue a prompt. images: (n_tiles, 3, S, S) pixel values for the prompt's `<|patch|>` tokens
        (images.prepare_images), checked against the prompt here so a bad request fails before it is queued."""
        params = (params or SamplingParams()).validate()
        if not prompt:
            raise ValueError("empty prompt: at least one token is needed")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary 0..{self.cfg.vocab_size - 1}")
        room = 1 if params.max_tokens else 0            # a prompt only scored (max_tokens 0) may fill the context
        if len(prompt) > self.max_seq_len - room:
            raise ContextLengthError(
                f"prompt is {len(prompt)} tokens; this model's context here is {self.max_seq_len} tokens "
                f"(prompt + generated), so at most {self.max_seq_len - room} prompt tokens fit")
        if images is not None:
            from .vision import image_token_mask     # raises for text-only models and count mismatches
            image_token_mask(torch.tensor([prompt]), images, self.cfg)
        req = Request(list(prompt), params, id=next(self._ids), constraint=constraint, images=images)
        if params.temperature > 0:
            req.generator = torch.Generator(device="cpu")
            req.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        if _penalized(params):                       # the penalties' token counts, kept only where they apply
            V = self.cfg.vocab_size
            req.counts = torch.zeros(V, device=self.device)
            req.seen = torch.zeros(V, dtype=torch.bool, device=self.device)
            req.seen[torch.tensor(prompt, device=self.device)] = True
        self.waiting.append(req)
        return req

    def cancel(self, req: Request, reason: str = "cancelled"):
        """Stop a request now (client gone, stop string seen): its cache row is free for the next step."""
        if req.finished:
            return
        req.finish_reason = reason
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def _release(self, req: Request):
        req.embeddings = None
        if req.row is not None and self.rows[req.row] is req:
            self.rows[req.row] = None
            self.cache.reset(req.row)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.rows if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # -- one step ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        events: list[tuple[Request, int]] = []
        self._admit()
        decoding = [r for r in self.rows if r is not None and r.prefilled == len(r.prompt)]
        prefilling = sorted((r for r in self.rows if r is not None and r.prefilled < len(r.prompt)),
                            key=lambda r: r.id)                     # first come, first prefilled
        if prefilling:
            events += self._prefill(self._plan_prefill(prefilling, len(decoding)))
        if decoding:
            start = time.perf_counter()
            events += self._decode(decoding)
            self._decode_seconds = _average(self._decode_seconds, time.perf_counter() - start)
        return events

    def _admit(self):
        """Waiting requests into free rows; a prompt starting with a cached prefix gets its keys and values."""
        for row in range(self.max_batch):
            if not self.waiting:
                break
            if self.rows[row] is not None:
                continue
            req = self.waiting.popleft()
            req.row = row
            self.rows[row] = req
            if req.images is not None:
                # Early fusion: the whole prompt embedded once, so an image may straddle prefill pieces.
                req.embeddings = self.model.embed(torch.tensor([req.prompt], device=self.device), req.images)
                req.images = None
                req.prefix_len = None            # patch token ids say nothing of the pixels: never cached
            elif self.prefix_cache is not None and req.params.prompt_logprobs is None:
                chain = self.prefix_cache.match(req.prompt, len(req.prompt) - 1)    # >= 1 token left for logits
                if chain:
                    B = self.prefix_cache.block_tokens
                    self.cache.write_positions(row, 0, [torch.cat(k) for k in zip(*(b.keys for b in chain))],
                                               [torch.cat(v) for v in zip(*(b.values for b in chain))])
                    req.prefilled = req.prefix_len = len(chain) * B
                    req.prefix_block = chain[-1]
                    self.prefix_cache.hit_tokens += req.prefilled

    def _plan_prefill(self, prefilling: list[Request], n_decoding: int) -> list[tuple[Request, int]]:
        """(request, tokens to prefill this step) for the prefilling requests, first come first."""
        cap = self.prefill_chunk
        if any(r.params.prompt_logprobs is not None for r in prefilling):
            # scoring needs every position's logits (B, piece, V): pieces shrink to bound them
            cap = max(1, min(cap, SCORING_LOGITS_BYTES // (4 * len(prefilling) * self.cfg.vocab_size)))
        if not n_decoding:
            return [(r, min(len(r.prompt) - r.prefilled, cap)) for r in prefilling]
        budget = max(MIN_PREFILL_PIECE, self._prefill_budget(n_decoding))
        plan = []
        for r in prefilling:
            n = min(len(r.prompt) - r.prefilled, cap, budget)
            if n <= 0:
                break
            plan.append((r, n))
            budget -= n
        return plan

    def _prefill_budget(self, n_decoding: int) -> int:
        """Prompt tokens a step may prefill beside n_decoding decoding rows: step_tokens minus those rows, or by
        default as many as the measured prefill speed runs in PREFILL_SHARE decode steps' time."""
        if self.step_tokens is not None:
            return self.step_tokens - n_decoding
        if self._decode_seconds is None or self._prefill_rate is None:
            return MIN_PREFILL_PIECE
        return min(self.prefill_chunk, int(PREFILL_SHARE * self._decode_seconds * self._prefill_rate))

    def _prefill(self, plan: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """One prefill piece per planned request: prompts with images alone (their embeddings), the rest together,
        right-padded (padding has position -1 and is never written)."""
        events = []
        text = [(r, n) for r, n in plan if r.embeddings is None]
        for r, n in plan:
            if r.embeddings is not None:
                events += self._prefill_piece([(r, n)])
        return events + (self._prefill_piece(text) if text else [])

    def _prefill_piece(self, plan: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        reqs = [r for r, _ in plan]
        counts = torch.tensor([n for _, n in plan], device=self.device)
        T = int(counts.max())
        tokens = torch.zeros(len(reqs), T, dtype=torch.long, device=self.device)
        pos = torch.full((len(reqs), T), -1, dtype=torch.long, device=self.device)
        for i, (r, n) in enumerate(plan):
            tokens[i, :n] = torch.tensor(r.prompt[r.prefilled:r.prefilled + n], device=self.device)
            pos[i, :n] = torch.arange(r.prefilled, r.prefilled + n, device=self.device)
        self._use_rows(reqs)
        embeddings = (reqs[0].embeddings[:, reqs[0].prefilled:reqs[0].prefilled + T]
                      if reqs[0].embeddings is not None else None)
        scoring = any(r.params.prompt_logprobs is not None for r in reqs)
        last = counts - 1                                  # each row's last token of this piece
        start = time.perf_counter()
        logits = self.model(tokens, input_pos=pos, kv_cache=self.cache, embeddings=embeddings,
                            logit_index=None if scoring else last)            # (B, T or 1, V)
        self._prefill_rate = _average(self._prefill_rate, int(counts.sum()) / (time.perf_counter() - start))
        if scoring:
            self._record_prompt_logprobs(plan, logits)
            logits = logits[torch.arange(len(reqs), device=self.device), last]       # (B, V)
        else:
            logits = logits[:, 0]
        done = []
        for i, (r, n) in enumerate(plan):
            r.prefilled += n
            self._remember_prefix(r)
            if r.prefilled == len(r.prompt):
                r.embeddings = None
                done.append(i)
        generating = [i for i in done if reqs[i].params.max_tokens > 0]
        for i in done:
            if reqs[i].params.max_tokens == 0:      # scored only: done, its row free for the next request
                reqs[i].finish_reason = "length"
                self._release(reqs[i])
        if not generating:
            return []
        return self._sample_and_advance([reqs[i] for i in generating], logits[generating])

    def _remember_prefix(self, r: Request):
        """Put the request's newly prefilled whole blocks of prompt into the prefix cache, while the cache row still
        holds them (a piece longer than a ring layer's chunk overwrites its start) and the chain holds."""
        pc = self.prefix_cache
        if pc is None or r.prefix_len is None:
            return
        B = pc.block_tokens
        while r.prefix_len + B <= r.prefilled:
            kv = self.cache.read_positions(r.row, r.prefix_len, B)
            block = pc.add(r.prefix_block, r.prompt[r.prefix_len:r.prefix_len + B], *kv) if kv else None
            if block is None:
                r.prefix_len = None                     # stop here: a later block would have no findable parent
                return
            r.prefix_block, r.prefix_len = block, r.prefix_len + B

    def _record_prompt_logprobs(self, plan: list[tuple[Request, int]], logits):
        """Append to each scoring request the logprob (and top alternatives) of the prompt tokens this piece
        predicts: logits (B, T, V) fp32, row i's first n_i at positions p .. p+n_i-1 (p = its tokens prefilled
        before this piece) predicting prompt tokens p+1 .. p+n_i. A prompt's first token has nothing before it:
        None."""
        for i, (r, n) in enumerate(plan):
            k = r.params.prompt_logprobs
            if k is None:
                continue
            p = r.prefilled
            if p == 0:
                r.prompt_logprobs.append(None)
            n = min(n, len(r.prompt) - 1 - p)          # positions here with a next prompt token
            if n <= 0:
                continue
            logp = logits[i, :n].log_softmax(-1)                                     # (n, V)
            nxt = torch.tensor(r.prompt[p + 1:p + 1 + n], device=logp.device)
            chosen = logp.gather(-1, nxt[:, None])[:, 0].tolist()                    # (n,)
            top = logp.topk(k, -1) if k else None
            top_ids, top_lps = (top.indices.tolist(), top.values.tolist()) if k else ([[]] * n, [[]] * n)
            r.prompt_logprobs += [{"logprob": lp, "top": list(zip(ids, lps))}
                                  for lp, ids, lps in zip(chosen, top_ids, top_lps)]

    def _use_rows(self, reqs: list[Request]):
        """Point the cache at these requests' rows for the next forward: consecutive rows (always so for one request)
        as a slice, so global layers read views instead of a copy of the context (and one row takes the batch-1
        paths); others as an index tensor."""
        rows = [r.row for r in reqs]
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.cache.rows = slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows, device=self.device)

    def _decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        # only the running rows, no idle ones as padding
        self._use_rows(reqs)
        tokens = torch.tensor([[r.output[-1]] for r in reqs], dtype=torch.long, device=self.device)        # (B, 1)
        pos = torch.tensor([[len(r.prompt) + len(r.output) - 1] for r in reqs], dtype=torch.long,
                           device=self.device)                                                             # (B, 1)
        logits = self.model(tokens, input_pos=pos, kv_cache=self.cache)[:, -1]   # (B, V)
        return self._sample_and_advance(reqs, logits)

    def _sample_and_advance(self, reqs, logits) -> list[tuple[Request, int]]:
        dev = logits.device
        P = [r.params for r in reqs]
        f = lambda name: torch.tensor([getattr(p, name) for p in P], dtype=torch.float32, device=dev)
        logits = logits.float()
        if any(_penalized(p) for p in P):
            # (B, V) copies, only when a penalty is on; a row without penalties gets zeros, which leave it unchanged
            none = torch.zeros(logits.shape[-1], device=dev)
            counts = torch.stack([r.counts if r.counts is not None else none for r in reqs])
            seen = torch.stack([r.seen if r.seen is not None else none.bool() for r in reqs])
            logits = apply_penalties(logits, counts, seen, f("repetition_penalty"), f("presence_penalty"),
                                     f("frequency_penalty"))
        scores = logits                  # logprobs report the model's distribution, before any constraint
        if any(r.constraint is not None for r in reqs):
            logits = logits.clone()
            for i, r in enumerate(reqs):
                if r.constraint is not None:
                    r.constraint.mask(logits[i])
        if all(p.temperature <= 0 for p in P):      # all greedy: sample's own first step, without its tensors
            ids = argmax_rows(logits)
        else:
            ids = sample(logits, f("temperature"), f("top_k").long(), f("top_p"), f("min_p"),
                         [r.generator for r in reqs])
        want_logprobs = any(p.logprobs is not None for p in P)
        logprobs = scores.log_softmax(-1) if want_logprobs else None
        events = []
        for i, r in enumerate(reqs):
            tok = int(ids[i])
            r.output.append(tok)
            if r.constraint is not None:
                r.constraint.accept(tok)
            if r.counts is not None:
                r.counts[tok] += 1
                r.seen[tok] = True
            if r.params.logprobs is not None:
                top = logprobs[i].topk(r.params.logprobs) if r.params.logprobs else None
                r.logprobs.append({"logprob": float(logprobs[i, tok]),
                                   "top": list(zip(top.indices.tolist(), top.values.tolist())) if top else []})
            events.append((r, tok))
            stop_ids = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(self.cfg.eos_token_ids))
            if tok in stop_ids:
                r.finish_reason = "stop"
            elif len(r.output) >= r.params.max_tokens or len(r.prompt) + len(r.output) >= self.max_seq_len:
                r.finish_reason = "length"
            if r.finished:
                self._release(r)
        return events


def _penalized(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


def _average(mean: float | None, x: float) -> float:
    return x if mean is None else (1 - AVERAGE_WEIGHT) * mean + AVERAGE_WEIGHT * x


def generate(model, prompts: list[list[int]], params: SamplingParams | None = None, **engine_kw) -> list[Request]:
    """Run prompts to completion as one batch; returns the finished requests in prompt order. The cache holds the
    longest prompt plus max_tokens unless max_seq_len says otherwise: the model's whole context (10M tokens for
    Scout) would be a cache of terabytes."""
    params = params or SamplingParams()
    engine_kw.setdefault("max_seq_len", max(map(len, prompts), default=1) + params.max_tokens)
    engine = Engine(model, max_batch=len(prompts), **engine_kw)
    reqs = [engine.add(p, params) for p in prompts]
    while engine.has_work():
        engine.step()
    return reqs


@torch.inference_mode()
def generate_reference(model, prompt: list[int], max_tokens: int, eos_ids=()) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step: no cache, no batching. Test reference."""
    ids = list(prompt)
    out = []
    for _ in range(max_tokens):
        tok = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok in eos_ids:
            break
    return out
