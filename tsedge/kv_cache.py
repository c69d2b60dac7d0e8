"""KV cache state owned by the runtime: device tensors plus the tokens they hold."""

from __future__ import annotations

import numpy as np
import tvm

from tsedge.models.config import CAPACITY
from tsedge.models.library import LibraryMeta


class ContextOverflowError(ValueError):
    """The prompt plus generation does not fit the KV cache."""


class KVCache:
    """``kv[num_layers, 2, n_kv, capacity, head_dim]`` on the device and the token ids in it.

    Tokens are appended by prefill/decode; ``truncate`` keeps a prefix (later rows are simply
    overwritten), which is how chat turns reuse the cache.
    """

    def __init__(self, meta: LibraryMeta, capacity: int, device: tvm.runtime.Device) -> None:
        cfg = meta.shard_model  # a tensor-parallel shard holds its own KV heads
        self.capacity = capacity
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.tensor = tvm.runtime.empty(shape, meta.kv_dtype, device)
        self.state_specs = meta.state
        self.device = device
        self.state = [tvm.runtime.empty([capacity if s == CAPACITY else s for s in shape], dtype, device)
                      for _, shape, dtype in self.state_specs]
        self.reset_state()
        self.tokens: list[int] = []

    def reset_state(self) -> None:
        """Zero the policy state (e.g. the selection cache): it describes the dropped tokens.
        In place: the library updates these tensors in place, and a CUDA graph of a decode step
        holds their addresses. Per-token state (a ``capacity`` dimension: data of each cached
        row, written with it) is kept, as the rows are."""
        for tensor, (_, shape, dtype) in zip(self.state, self.state_specs):
            if CAPACITY not in shape:
                tensor.copyfrom(np.zeros(shape, dtype))

    def __len__(self) -> int:
        return len(self.tokens)

    def check_room(self, new_tokens: int) -> None:
        if len(self.tokens) + new_tokens > self.capacity:
            raise ContextOverflowError(
                f"context of {len(self.tokens) + new_tokens} tokens ({len(self.tokens)} cached + "
                f"{new_tokens} new) exceeds the KV cache of {self.capacity} tokens; shorten the "
                "prompt, lower --max-new-tokens, or use a library compiled with a larger "
                "--max-context")

    def common_prefix(self, tokens: list[int]) -> int:
        """Length of the cached prefix shared with ``tokens``."""
        n = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            n += 1
        return n

    def truncate(self, length: int) -> None:
        if length < len(self.tokens):
            del self.tokens[length:]
            self.reset_state()
