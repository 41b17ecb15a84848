"""The engine's KV cache: per-layer key / value buffers, one row per running request, and where each token goes.

For Llama 4 the layout is hybrid: a chunked-attention layer can only ever see keys of the current `attn_chunk_size`
chunk, so it keeps a ring of one chunk; NoPE (global) layers keep all. Knows nothing of requests or scheduling
(engine.py) nor of the kernels that read it (cpu/decode.py takes its views and slots).
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .ops import QuantizedKV, quantize_kv


class ContextLengthError(ValueError):
    """A prompt that does not fit the context window; the message gives the limits."""


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
