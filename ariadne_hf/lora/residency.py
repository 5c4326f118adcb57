"""Resident adapter slots: which adapters occupy the routed layers' slots, least-recently-used eviction, pins.

Bookkeeping only (no tensors): `LoraBank` moves the weights. With ``capacity=None`` every adapter is resident
and slot a holds adapter a (the default). With ``capacity=N`` the layers hold N slots; a call makes the adapters
its rows route to resident before its forward (`acquire`), pinning them until it ends (`release`), so a
concurrent call can never evict an adapter another call is using.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass


@dataclass
class ResidencyStats:
    """Counters of one bank: calls whose adapters were all resident already (`hits`), adapters loaded into a slot
    (`loads`), adapters evicted to make room (`evictions`) and bytes read from adapter files for loads."""

    hits: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class ResidencyError(RuntimeError):
    """A call needs more adapters resident at once than there are slots."""


class SlotTable:
    """Adapter index <-> slot index, with LRU order and per-adapter pin counts. Thread-safe."""

    def __init__(self, capacity: int | None):
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"max_resident_adapters must be a positive integer or None, got {capacity!r}.")
        self.capacity = capacity
        self.slot_of: list[int] = []  # per adapter, -1 = not resident
        self.adapter_in_slot: list[int] = []  # per slot, -1 = free
        self.recent: OrderedDict[int, None] = OrderedDict()  # resident adapters, least recently used first
        self.pins: Counter[int] = Counter()
        self.stats = ResidencyStats()
        self.lock = threading.RLock()

    @property
    def unlimited(self) -> bool:
        return self.capacity is None

    @property
    def num_slots(self) -> int:
        return len(self.adapter_in_slot)

    def append_adapter(self) -> int:
        """Register a new adapter (the next index); returns the slot it should be loaded into now, or -1."""
        with self.lock:
            index = len(self.slot_of)
            if self.unlimited:
                self.slot_of.append(index)
                self.adapter_in_slot.append(index)
                return index
            self.slot_of.append(-1)
            if len(self.adapter_in_slot) < self.capacity:
                self.adapter_in_slot.append(-1)
            free = [s for s, a in enumerate(self.adapter_in_slot) if a < 0]
            if not free:
                return -1
            self._place(index, free[0])
            return free[0]

    def remove_adapter(self, index: int) -> int:
        """Forget adapter `index` (later adapters shift down by one); returns the slot it freed, or -1."""
        with self.lock:
            if self.pins[index]:
                raise ResidencyError("Cannot remove an adapter that a running call is using.")
            slot = self.slot_of.pop(index)
            self.recent.pop(index, None)
            self.pins.pop(index, None)
            self.recent = OrderedDict((a - (a > index), None) for a in self.recent)
            self.pins = Counter({a - (a > index): n for a, n in self.pins.items()})
            if self.unlimited:
                self.adapter_in_slot = list(range(len(self.slot_of)))
                return slot
            self.adapter_in_slot = [-1 if a == index else a - (a > index) for a in self.adapter_in_slot]
            return slot

    def acquire(self, adapters) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
        """Pin `adapters` (indices) and give each a slot: returns ({adapter: slot}, [(adapter, slot, evicted)]) where
        the second list holds the loads the caller must perform (evicted = the adapter that was in the slot, or -1).

        Raises ResidencyError when more adapters than slots would have to be resident at once."""
        adapters = sorted(set(adapters))
        with self.lock:
            if self.unlimited:
                return {a: a for a in adapters}, []
            missing = [a for a in adapters if self.slot_of[a] < 0]
            pinned_elsewhere = {a for a, n in self.pins.items() if n > 0} - set(adapters)
            if len(adapters) + len(pinned_elsewhere) > self.capacity:
                raise ResidencyError(
                    f"This call needs {len(adapters)} adapters resident at once (plus {len(pinned_elsewhere)} pinned by "
                    f"running calls) but max_resident_adapters={self.capacity}. Raise max_resident_adapters, send "
                    "smaller batches, or use generation_strategy='grouped' (one adapter group at a time)."
                )
            loads = []
            for adapter in missing:
                free = [s for s, a in enumerate(self.adapter_in_slot) if a < 0]
                if free:
                    slot, evicted = free[0], -1
                else:
                    evicted = next(a for a in self.recent if not self.pins[a] and a not in adapters)
                    slot = self.slot_of[evicted]
                    self.slot_of[evicted] = -1
                    self.recent.pop(evicted)
                    self.stats.evictions += 1
                self._place(adapter, slot)
                loads.append((adapter, slot, evicted))
            if not missing:
                self.stats.hits += 1
            for adapter in adapters:
                self.pins[adapter] += 1
                self.recent.move_to_end(adapter)
            return {a: self.slot_of[a] for a in adapters}, loads

    def release(self, adapters) -> None:
        """Unpin adapters acquired by a call that has ended."""
        if self.unlimited:
            return
        with self.lock:
            for adapter in set(adapters):
                if self.pins[adapter] > 0:
                    self.pins[adapter] -= 1

    def _place(self, adapter: int, slot: int) -> None:
        self.slot_of[adapter] = slot
        self.adapter_in_slot[slot] = adapter
        self.recent[adapter] = None
        self.recent.move_to_end(adapter)
