"""A cache of routed experts under a byte budget, filled on demand and by prefetch.

The experts of a model bigger than memory stay in their files; :class:`ExpertCache` holds
at most ``budget // expert_bytes`` of them at a time (every expert of a model has the same
size). A miss reads the expert in the calling thread; :meth:`ExpertCache.prefetch` reads
guessed experts in one background thread while the model computes, into free slots or by
evicting experts of layers other than the two at work. Eviction is LRU, or LFU (fewest
uses, ties by recency) with counts that may be seeded from routing statistics. An expert
in use or being read is never evicted. Counters (:class:`OffloadStats`) are exact: tests
script a routing sequence and check them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

POLICIES = ("lru", "lfu")


@dataclass
class OffloadStats:
    """Counters of an :class:`ExpertCache` (cumulative; subtract two snapshots for a span).

    Attributes:
        hits: expert uses found in the cache (prefetched ones included).
        misses: expert uses read on demand.
        prefetched: experts read ahead by :meth:`ExpertCache.prefetch`.
        prefetch_used: prefetched experts used before they were evicted.
        evictions: experts dropped to make room.
        bytes_read: bytes read from the files (demand and prefetch).
        wait_s: seconds the computing thread waited for weights (its own reads, and
            prefetches still under way).
    """

    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    evictions: int = 0
    bytes_read: int = 0
    wait_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        uses = self.hits + self.misses
        return self.hits / uses if uses else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """The share of prefetched experts that were then used."""
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    def __sub__(self, other: OffloadStats) -> OffloadStats:
        return OffloadStats(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def summary(self, tokens: int = 0) -> str:
        per_token = f", {self.bytes_read / tokens / 2**20:,.1f} MiB read per token" if tokens else ""
        prefetch = (f"; prefetch accuracy {self.prefetch_accuracy:.1%} of {self.prefetched}" if self.prefetched
                    else "; nothing prefetched")
        return (f"expert cache: hit rate {self.hit_rate:.1%} ({self.hits} hits, {self.misses} misses){prefetch}"
                f"{per_token}; {self.wait_s:.3f}s waiting for weights")


class _Entry:
    __slots__ = ("weights", "ready", "pins", "prefetched", "error")

    def __init__(self, prefetched: bool):
        self.weights: tuple[torch.Tensor, ...] | None = None
        self.ready = threading.Event()
        self.pins = 1 if prefetched else 2  # one per reader and user: pinned, never evicted
        self.prefetched = prefetched
        self.error: BaseException | None = None


class ExpertCache:
    """At most ``budget`` bytes of experts, keyed ``(layer, expert)``.

    Args:
        read: ``read(layer, expert) -> tuple of weight tensors`` (from the files).
        expert_bytes: bytes of one expert's weights as ``read`` returns them.
        budget: bytes the cache may hold (in use, cached and being read together).
        min_experts: the fewest experts the budget must hold (a layer's ``top_k``).
        policy: ``"lru"`` or ``"lfu"``.
        prefetch: read guessed experts in a background thread (:meth:`prefetch`).
        counts: LFU's starting use counts, ``counts[layer][expert]`` (routing statistics).
    """

    def __init__(self, read: Callable[[int, int], tuple[torch.Tensor, ...]], expert_bytes: int, budget: int,
                 min_experts: int = 1, policy: str = "lru", prefetch: bool = True,
                 counts: Iterable[Iterable[float]] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.capacity = budget // expert_bytes
        if self.capacity < min_experts:
            raise ValueError(f"an expert memory of {budget:,} bytes holds {self.capacity} expert(s) of "
                             f"{expert_bytes:,} bytes; at least {min_experts} (top_k, the experts one token uses in "
                             f"one layer) are needed: give at least {min_experts * expert_bytes:,} bytes")
        self.read, self.expert_bytes, self.budget, self.policy = read, expert_bytes, budget, policy
        self.stats = OffloadStats()
        self.peak_bytes = 0  # the most bytes held at once (tests check it against the budget)
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()  # least recently used first
        self._uses: dict[tuple[int, int], float] = {}
        for layer, row in enumerate(counts or ()):
            for e, n in enumerate(row):
                self._uses[(layer, e)] = float(n)
        self._lock = threading.Condition()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch") if prefetch else None

    @property
    def prefetching(self) -> bool:
        return self._pool is not None

    def held_bytes(self) -> int:
        return len(self._entries) * self.expert_bytes

    def cached(self) -> list[tuple[int, int]]:
        """The keys held now, least recently used first."""
        with self._lock:
            return list(self._entries)

    @contextmanager
    def expert(self, layer: int, e: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """``with cache.expert(layer, e) as weights``: the expert's weights, held (never
        evicted) until the block ends; read now on a miss."""
        key, t0, read_here = (layer, e), time.perf_counter(), False
        with self._lock:
            self._uses[key] = self._uses.get(key, 0.0) + 1
            entry = self._entries.get(key)
            if entry is not None:
                self.stats.hits += 1
                self._entries.move_to_end(key)
                entry.pins += 1
                if entry.prefetched:
                    entry.prefetched = False
                    self.stats.prefetch_used += 1
            else:
                self.stats.misses += 1
                self._make_room(wait=True)
                entry = self._entries[key] = _Entry(prefetched=False)
                self._note_peak()
                read_here = True
        try:
            if read_here:
                self._fill(key, entry)
            entry.ready.wait()
            if entry.error is not None:
                raise entry.error
            self.stats.wait_s += time.perf_counter() - t0
            yield entry.weights
        finally:
            with self._lock:
                entry.pins -= 1
                if entry.error is not None and self._entries.get(key) is entry:
                    del self._entries[key]
                self._lock.notify_all()

    def prefetch(self, layer: int, experts: Iterable[int], keep_layers: tuple[int, ...] = ()) -> int:
        """Start reading ``experts`` of ``layer`` (the likeliest first) in the background,
        into free slots or in place of experts of layers not in ``keep_layers`` (nor
        ``layer``), as many as fit. Returns how many reads started."""
        if self._pool is None:
            return 0
        keep, started = {layer, *keep_layers}, 0
        for e in experts:
            key = (layer, int(e))
            with self._lock:
                if key in self._entries:
                    continue
                if not self._make_room(wait=False, keep=keep):
                    break
                entry = self._entries[key] = _Entry(prefetched=True)
                self._note_peak()
                self.stats.prefetched += 1
            self._pool.submit(self._fill, key, entry)
            started += 1
        return started

    def close(self) -> None:
        """Finish reads under way, stop the prefetch thread and drop every cached expert (the
        memory comes back now, not when a garbage collection breaks the model's cycles)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            self._entries.clear()

    def _fill(self, key: tuple[int, int], entry: _Entry) -> None:
        try:
            weights = self.read(*key)
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            if nbytes != self.expert_bytes:
                raise ValueError(f"expert {key[1]} of layer {key[0]} has {nbytes:,} bytes, expected {self.expert_bytes:,}")
        except BaseException as exc:  # handed to whoever uses the expert
            entry.error = exc
            weights, nbytes = None, 0
        with self._lock:
            entry.weights = weights
            self.stats.bytes_read += nbytes
            if entry.prefetched and entry.error is not None:  # nobody waits for it: drop it
                del self._entries[key]
                self.stats.prefetched -= 1
            entry.pins -= 1
            entry.ready.set()
            self._lock.notify_all()

    def _make_room(self, wait: bool, keep: set[int] = frozenset()) -> bool:
        """Evict until one more expert fits (holding the lock). ``wait``: when every held
        expert is in use or being read, wait for one to come free; else give up (False)."""
        while len(self._entries) >= self.capacity:
            free = [k for k, v in self._entries.items() if v.pins == 0 and k[0] not in keep]
            if free:
                victim = free[0] if self.policy == "lru" else min(free, key=lambda k: self._uses.get(k, 0.0))
                del self._entries[victim]
                self.stats.evictions += 1
            elif wait:
                if all(v.ready.is_set() for v in self._entries.values()):  # nothing will come free
                    raise RuntimeError(f"all {self.capacity} cached experts are in use at once; the expert memory "
                                       "must hold more of them")
                self._lock.wait()
            else:
                return False
        return True

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())
