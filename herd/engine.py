"""The generation engine: KV cache, sampling, batched prefill and decode, continuous batching. Token ids only.

- The KV cache (kv_cache.KVCache) preallocates per-layer buffers, one row per running request.
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
from .kv_cache import ContextLengthError, KVCache
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
    logit_bias: dict[int, float] | None = None   # OpenAI's: added to these tokens' logits (-100 bans, 100 forces)
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
                  (not scoring or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]"),
                  (all(isinstance(t, int) and isinstance(b, (int, float)) and -100 <= b <= 100
                       for t, b in (self.logit_bias or {}).items()),
                   "logit_bias maps token ids (int) to biases from -100 to 100")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


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
    bias: tuple[torch.Tensor, torch.Tensor] | None = None   # logit_bias as (ids, biases), each (n,)
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
        # a batch of 0 rows would queue every request for ever: refused here, not found as a hang
        if max_batch < 1 or (max_seq_len is not None and max_seq_len < 1):
            raise ValueError(f"max_batch and max_seq_len must be >= 1; got {max_batch}, {max_seq_len}")
        if prefill_chunk < 1 or (step_tokens is not None and step_tokens < 1) or prefix_cache_mib < 0:
            raise ValueError(f"prefill_chunk and step_tokens must be >= 1 and prefix_cache_mib >= 0; got "
                             f"{prefill_chunk}, {step_tokens}, {prefix_cache_mib}")
        self.max_seq_len = min(max_seq_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
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
        for what, ids in (("token ids", prompt), ("logit_bias token ids", params.logit_bias or ())):
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"{what} {bad[:5]} outside the vocabulary 0..{self.cfg.vocab_size - 1}")
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
        if params.logit_bias:
            req.bias = (torch.tensor(list(params.logit_bias), dtype=torch.long, device=self.device),
                        torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=self.device))
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
        if any(r.bias is not None for r in reqs):
            logits = logits.clone()      # (B, V): the model's own rows may be a view that is used again
            for i, r in enumerate(reqs):
                if r.bias is not None:
                    logits[i, r.bias[0]] += r.bias[1]
        # logprobs report the distribution sampled from after penalties and logit_bias, before any constraint
        scores = logits
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
