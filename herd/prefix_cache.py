"""The shared-prefix cache: keys and values of prompt prefixes already prefilled, reused by later prompts that start
with the same tokens (a system prompt and tool list every request repeats). Token ids and tensors only: it knows
nothing of requests, sampling or the model; engine.py reads blocks out of and writes them into its KVCache.

A prefix is cached in blocks of `block_tokens` tokens, each entry one block's keys and values for every layer. An
entry is found by (its parent entry's id, its block's token ids): exact tuples, not hashes, so two different
prefixes can never share an entry (a block's keys depend on every token before it, which the parent chain pins).
Entries hold each position's key and value as attention computed them, for ring (chunked) layers too: written back
in position order into a ring, later positions overwrite earlier slots exactly as a cold prefill leaves them.
Least recently used leaves are evicted past `max_bytes`.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Block:
    id: int
    parent: "Block | None"
    tokens: tuple[int, ...]
    keys: list[torch.Tensor]            # per layer (block_tokens, K, D), in the cache's dtype
    values: list[torch.Tensor]
    children: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def key(self):
        return (self.parent.id if self.parent else 0, self.tokens)


class PrefixCache:
    """Blocks of prefilled prompt prefixes, looked up by exact token ids. Not thread-safe (the engine's thread)."""

    def __init__(self, block_tokens: int = 32, max_bytes: int = 256 << 20):
        if block_tokens < 1 or max_bytes < 0:
            raise ValueError(f"prefix cache: block_tokens must be >= 1 and max_bytes >= 0; got {block_tokens}, "
                             f"{max_bytes}")
        self.block_tokens, self.max_bytes = block_tokens, max_bytes
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()    # least recently used first
        self.nbytes = 0
        self.hit_tokens = 0          # prompt tokens served from the cache instead of prefilled (for /metrics)
        self._ids = itertools.count(1)

    def match(self, prompt: list[int], limit: int) -> list[Block]:
        """The longest chain of cached blocks that starts `prompt` and covers at most `limit` tokens, oldest first;
        each block found is marked as just used."""
        chain, parent, B = [], None, self.block_tokens
        for start in range(0, limit - B + 1, B):
            block = self.blocks.get((parent.id if parent else 0, tuple(prompt[start:start + B])))
            if block is None:
                break
            chain.append(block)
            parent = block
        for block in chain:
            self.blocks.move_to_end(block.key)
        return chain

    def add(self, parent: Block | None, tokens: list[int], keys: list[torch.Tensor],
            values: list[torch.Tensor]) -> Block | None:
        """Cache one block (its tokens follow `parent`'s, or start a prompt for None) and return it; an existing
        equal block is returned instead. None when it cannot be cached (its parent was evicted, or one block is
        larger than max_bytes). keys / values: per layer (block_tokens, K, D), copied."""
        if len(tokens) != self.block_tokens:
            raise ValueError(f"a block is {self.block_tokens} tokens; got {len(tokens)}")
        if parent is not None and self.blocks.get(parent.key) is not parent:
            return None                  # the parent was evicted meanwhile: a child of it could never be found
        key = (parent.id if parent else 0, tuple(tokens))
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return self.blocks[key]
        block = Block(next(self._ids), parent, key[1], [k.clone() for k in keys], [v.clone() for v in values])
        if block.nbytes > self.max_bytes:
            return None
        self.blocks[key] = block
        self.nbytes += block.nbytes
        if parent is not None:
            parent.children += 1
        self._evict(keep=block)
        return block

    def _evict(self, keep: Block):
        """Drop least recently used leaves (a block no other block continues) until under max_bytes. Blocks of the
        chain being extended are just used, so they go last; `keep` itself is never dropped here."""
        while self.nbytes > self.max_bytes:
            victim = next((b for b in self.blocks.values() if b.children == 0 and b is not keep), None)
            if victim is None:
                return
            del self.blocks[victim.key]
            self.nbytes -= victim.nbytes
            if victim.parent is not None:
                victim.parent.children -= 1
