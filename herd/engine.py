"""The generation engine: KV cache, sampling, batched prefill and decode, continuous batching. Token ids only.

- KVCache preallocates per-layer buffers. For Llama 4 the layout is hybrid: a chunked-attention layer can only ever
  see keys of the current `attn_chunk_size` chunk, so it keeps a ring of one chunk; NoPE (global) layers keep all.
- Engine admits requests into free cache rows between decode steps (continuous batching): waiting prompts are
  prefilled together, right-padded (padding has position -1 and is never written), in pieces of `prefill_chunk`
  tokens so activation memory does not grow with the prompt; then one batched decode step runs every active row.
- Sampling is a pure function of (logits, per-row parameters, per-row generators).
- `generate_reference` is the naive no-cache loop the engine is tested against.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .ops import QuantizedKV, quantize_kv


# Scoring a prompt (prompt_logprobs) needs the logits of every prompt position, (B, piece, V) fp32: prefill pieces
# are shortened so that one piece's logits stay under this many bytes.
SCORING_LOGITS_BYTES = 256 << 20


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


# ---- sampling -----------------------------------------------------------------------------------------------------
def apply_penalties(logits, output_counts, seen, repetition, presence, frequency):
    """logits (B, V); output_counts (B, V) generated-token counts; seen (B, V) bool prompt-or-output tokens;
    penalties (B,). Returns new logits."""
    rep = repetition[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen & (rep != 1.0), penalized, logits)
    return logits - presence[:, None] * (output_counts > 0) - frequency[:, None] * output_counts


def filter_logits(logits, temperature, top_k, top_p, min_p):
    """Temperature, top-k, min-p and top-p on (B, V) logits with per-row parameters (B,); filtered entries -inf."""
    logits = logits / temperature.clamp(min=1e-6)[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    remove = rank >= k
    probs = sorted_logits.softmax(-1)
    remove |= probs < min_p[:, None] * probs[:, :1]
    # top-p keeps the smallest prefix whose mass reaches p (the first token always stays)
    remove |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def argmax_rows(logits):
    """logits (B, V) -> the index of each row's first largest value (B,), as logits.argmax(-1) (a NaN counts as the
    largest). On the CPU through numpy: torch's CPU argmax measured 150 us on one 49k-vocab row here, numpy's 9 us
    (~1.5% of a SmolLM2 decode step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.detach().numpy().argmax(-1))
    return logits.argmax(-1)


def sample(logits, temperature, top_k, top_p, min_p, generators):
    """Next ids (B,) from logits (B, V): argmax where temperature is 0, else a draw from the filtered distribution
    with that row's generator (so a seeded request is reproducible whatever else is in the batch)."""
    greedy = argmax_rows(logits)
    if bool((temperature <= 0).all()):
        return greedy
    probs = filter_logits(logits.float(), temperature, top_k, top_p, min_p).softmax(-1)
    drawn = torch.stack([torch.multinomial(probs[i], 1, generator=generators[i])[0] if temperature[i] > 0
                         else greedy[i] for i in range(logits.shape[0])])
    return drawn


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

    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds (keys, values, int8 scales, slot positions)."""
        tensors = [t for x in (*self.k, *self.v)
                   for t in ((x.values, x.scale) if isinstance(x, QuantizedKV) else (x,))]
        return sum(t.numel() * t.element_size() for t in (*tensors, *self.pos))

    def reset(self, row: int):
        for p in self.pos:
            p[row] = -1

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
        kb = self.k[layer]
        if type(kb) is not torch.Tensor or not isinstance(self.rows, slice):
            return None
        row = self.rows.start or 0
        if (self.rows.stop or 0) - row != 1:
            return None
        S = kb.shape[1]
        if not self.ring[layer] and p >= S:
            raise ContextLengthError(f"position {p} is past the cache's {S} slots")
        return kb[row], self.v[layer][row], self.pos[layer][row], p % S, S if self.ring[layer] else p + 1

    def decode_slots(self, layer: int, pos):
        """Where a decode step's tokens go, one per row of `rows` at positions pos (B, 1): (k, v (R, S, K, D) and pos
        (R, S), the layer's whole buffers; then per row, int64 (B,) each: its cache row, its slot, how many slots from
        0 attention reads). `update` writes slots itself; decode.HerdBlock has its C++ layer (decode_layer_rows) write
        them. None when keys are int8 or a row is padding (position < 0)."""
        kb = self.k[layer]
        if type(kb) is not torch.Tensor:
            return None
        # Every layer of a step gets the same positions and rows, and the per-row tensors depend only on the
        # layer's kind (ring or not, S): computed once per kind and step (~10 us of torch ops per layer otherwise).
        # Compared by value (copies kept): inference tensors have no version counter to tell in-place changes.
        memo = self._slots_memo
        if memo is None or not (_same(memo[0], pos) and _same(memo[1], self.rows)):
            memo = self._slots_memo = (pos.clone(), self.rows.clone() if torch.is_tensor(self.rows) else self.rows,
                                       {})
        kind = (self.ring[layer], kb.shape[1])
        if kind not in memo[2]:
            memo[2][kind] = self._row_slots(pos, *kind)
        per_row = memo[2][kind]
        return None if per_row is None else (kb, self.v[layer], self.pos[layer], *per_row)

    def _row_slots(self, pos, ring: bool, S: int):
        """decode_slots' per-row tensors (cache rows, slots, slots read) for positions pos (B, 1) in layers of this
        kind, or None when a position is padding."""
        p = pos.reshape(-1)                                                # (B,)
        lowest, highest = torch.aminmax(p)
        if int(lowest) < 0:
            return None
        if not ring and int(highest) >= S:
            raise ContextLengthError(f"position {int(highest)} is past the cache's {S} slots")
        n_slots = torch.full_like(p, S) if ring else p + 1
        return self._row_ids(p.shape[0]).long().contiguous(), p % S, n_slots

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
    images: torch.Tensor | None = None   # pixel values for the prompt's image patch tokens, dropped after prefill
    # Optional per-request constraint (grammar-constrained decoding, herd/constrain.py): `mask(logits)` sets the
    # logits (V,) of forbidden tokens to -inf in place before sampling; `accept(token_id)` advances its state.
    constraint: object | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous batching over one model. `add` queues a request; each `step` admits waiting requests into free
    cache rows (one batched, chunked prefill), then decodes one token for every running request, and returns the
    (request, token id) pairs it produced. Not thread-safe: one thread drives it."""

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 cache_dtype=None, kv_int8: bool = False):
        self.model = model
        self.cfg: ModelConfig = model.config
        self.max_seq_len = min(max_seq_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.prefill_chunk = prefill_chunk
        p = next(model.parameters())
        self.device = p.device
        self.cache = KVCache(self.cfg, max_batch, self.max_seq_len, cache_dtype or self._activation_dtype(p),
                             p.device, kv_int8=kv_int8)
        self.max_batch = max_batch
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._ids = itertools.count()

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
        admitted = self._admit()
        if admitted:
            events += self._prefill(admitted)
        decoding = [r for r in self.rows if r is not None and r not in admitted]
        if decoding:
            events += self._decode(decoding)
        return events

    def _admit(self) -> list[Request]:
        admitted = []
        for row in range(self.max_batch):
            if not self.waiting:
                break
            if self.rows[row] is None:
                req = self.waiting.popleft()
                req.row = row
                self.rows[row] = req
                admitted.append(req)
        return admitted

    def _prefill(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        lengths = torch.tensor([len(r.prompt) for r in reqs], device=self.device)
        T = int(lengths.max())
        tokens = torch.zeros(len(reqs), T, dtype=torch.long, device=self.device)
        for i, r in enumerate(reqs):
            tokens[i, :len(r.prompt)] = torch.tensor(r.prompt, device=self.device)
        cols = torch.arange(T, device=self.device)[None]
        pos = torch.where(cols < lengths[:, None], cols, -1)          # (B, T), -1 = right padding
        rows = [r.row for r in reqs]
        # consecutive rows (always so for one request) are a slice: global layers then read views, not a copy of
        # the whole context per prefill piece
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.cache.rows = slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows, device=self.device)
        # Early fusion: embed the whole prompt once, so an image may straddle prefill pieces.
        images = [r.images for r in reqs if r.images is not None]
        embeddings = self.model.embed(tokens, torch.cat(images)) if images else None
        for r in reqs:
            r.images = None
        # Scoring needs every position's logits (B, piece, V), not one per row: pieces shrink to bound them.
        scoring = any(r.params.prompt_logprobs is not None for r in reqs)
        piece_len = self.prefill_chunk if not scoring else max(
            1, min(self.prefill_chunk, SCORING_LOGITS_BYTES // (4 * len(reqs) * self.cfg.vocab_size)))
        last_logits = None
        for start in range(0, T, piece_len):
            end = min(start + piece_len, T)
            # each row's last prompt token, if it falls inside this piece
            idx = (lengths - 1 - start).clamp(0, end - start - 1)
            piece = embeddings[:, start:end] if embeddings is not None else None
            logits = self.model(tokens[:, start:end], input_pos=pos[:, start:end], kv_cache=self.cache,
                                embeddings=piece, logit_index=None if scoring else idx)     # (B, 1 or piece, V)
            if scoring:
                self._record_prompt_logprobs(reqs, tokens, logits, start)
                logits = logits[torch.arange(len(reqs), device=self.device), idx]         # (B, V)
            else:
                logits = logits[:, 0]
            here = (lengths - 1 >= start) & (lengths - 1 < end)
            last_logits = logits if last_logits is None else torch.where(here[:, None], logits, last_logits)
        generating = [i for i, r in enumerate(reqs) if r.params.max_tokens > 0]
        for r in reqs:
            if r.params.max_tokens == 0:             # scored only: done, its row free for the next request
                r.finish_reason = "length"
                self._release(r)
        if not generating:
            return []
        return self._sample_and_advance([reqs[i] for i in generating], last_logits[generating])

    def _record_prompt_logprobs(self, reqs, tokens, logits, start: int):
        """Append to each scoring request the logprob (and top alternatives) of its prompt tokens start+1 ..
        start+piece, predicted by the logits at positions start .. start+piece-1. tokens (B, T); logits (B, piece,
        V) in fp32. A prompt's first token has nothing before it: None."""
        for i, r in enumerate(reqs):
            k = r.params.prompt_logprobs
            if k is None:
                continue
            if start == 0:
                r.prompt_logprobs.append(None)
            n = min(logits.shape[1], len(r.prompt) - 1 - start)         # positions here with a next prompt token
            if n <= 0:
                continue
            logp = logits[i, :n].log_softmax(-1)                                     # (n, V)
            chosen = logp.gather(-1, tokens[i, start + 1:start + 1 + n, None])[:, 0].tolist()   # (n,)
            top = logp.topk(k, -1) if k else None
            top_ids, top_lps = (top.indices.tolist(), top.values.tolist()) if k else ([[]] * n, [[]] * n)
            r.prompt_logprobs += [{"logprob": lp, "top": list(zip(ids, lps))}
                                  for lp, ids, lps in zip(chosen, top_ids, top_lps)]

    def _decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        # Only the running rows, no idle ones as padding: consecutive rows as a slice (views; one row takes the
        # batch-1 paths), others as an index tensor.
        rows = [r.row for r in reqs]
        tokens = torch.tensor([[r.output[-1]] for r in reqs], dtype=torch.long, device=self.device)        # (B, 1)
        pos = torch.tensor([[len(r.prompt) + len(r.output) - 1] for r in reqs], dtype=torch.long,
                           device=self.device)                                                             # (B, 1)
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.cache.rows = slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows, device=self.device)
        logits = self.model(tokens, input_pos=pos, kv_cache=self.cache)[:, -1]   # (B, V)
        return self._sample_and_advance(reqs, logits)

    def _sample_and_advance(self, reqs, logits) -> list[tuple[Request, int]]:
        dev = logits.device
        P = [r.params for r in reqs]
        f = lambda name: torch.tensor([getattr(p, name) for p in P], dtype=torch.float32, device=dev)
        logits = logits.float()
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in P):
            counts = torch.stack([r.counts for r in reqs])      # (B, V) copies: only when a penalty is on
            seen = torch.stack([r.seen for r in reqs])
            logits = apply_penalties(logits, counts, seen, f("repetition_penalty"), f("presence_penalty"),
                                     f("frequency_penalty"))
        scores = logits                  # logprobs report the model's distribution, before any constraint
        if any(r.constraint is not None for r in reqs):
            logits = logits.clone()
            for i, r in enumerate(reqs):
                if r.constraint is not None:
                    r.constraint.mask(logits[i])
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


def generate(model, prompts: list[list[int]], params: SamplingParams | None = None, **engine_kw) -> list[Request]:
    """Run prompts to completion as one batch; returns the finished requests in prompt order."""
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
