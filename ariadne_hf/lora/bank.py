"""`LoraBank`: every adapter's LoRA weights, held once, in the routed layers of one backbone.

The bank swaps a `RoutedLoraLinear` in for every linear module that at least one adapter targets, fills the
layers' stacked buffers straight from the adapters' safetensors files (`peft_files`), keeps the adapters in
router order, and builds the `GateFactory` the call plans use. Loading N adapters reads each file once and
allocates every layer's stacks once: O(total adapter bytes), never O(N^2) as injecting them one by one into
PEFT is.

With ``max_resident`` (``max_resident_adapters``) the layers hold only that many slots: the other adapters stay
in their (memory-mapped) safetensors files until a call routes to them; `acquire` loads them, evicting the least
recently used unpinned adapters (`residency.SlotTable`). Gates index slots, never adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import resolve_backend
from .gate import GateFactory
from .layer import RoutedLoraLinear, base_features
from .peft_files import AdapterLayout, inspect_adapter, read_module_weights, write_adapter
from .residency import ResidencyStats, SlotTable


class LoraBank:
    """The adapters of one routed model, in router order (index a = `names[a]`), and the layers holding them."""

    def __init__(self, backbone: nn.Module, max_resident: int | None = None):
        self.backbone = backbone
        self.slots = SlotTable(max_resident)
        self.layouts: list[AdapterLayout] = []
        self.layers: dict[str, RoutedLoraLinear] = {}
        for name, module in backbone.named_modules():
            if isinstance(module, RoutedLoraLinear):
                self.layers[name] = module
        self._factories: dict[tuple, GateFactory] = {}
        self._groups: list[list[float]] = []  # distinct per-layer scaling vectors [A] (see _refresh_groups)

    # ---- queries --------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [layout.name for layout in self.layouts]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def layout(self, name: str) -> AdapterLayout:
        return self.layouts[self.index(name)]

    def linear_modules(self) -> dict[str, nn.Module]:
        """Backbone module name -> layer LoRA can target: nn.Linear (quantized subclasses included) or transformers'
        Conv1D (routed layers stand for their base layer)."""
        modules: dict[str, nn.Module] = dict(self.layers)
        for name, module in self.backbone.named_modules():
            if name not in modules and name.rpartition(".")[0] not in self.layers and base_features(module):
                modules[name] = module
        return modules

    def module_types(self) -> dict[str, str]:
        """Every backbone module name -> its class name (so a refused target's error can name its type)."""
        return {name: type(module).__name__ for name, module in self.backbone.named_modules()}

    def memory_bytes(self) -> int:
        """Bytes allocated for every routed layer's stacked LoRA buffers (the adapters' run-time memory,
        including the headroom reserved by add_adapter)."""
        total = 0
        for layer in self.layers.values():
            spare = getattr(layer, "_spare", None)
            live = spare if spare is not None and spare[0].data_ptr() == layer.lora_A.data_ptr() else (
                layer.lora_A, layer.lora_B, layer.scaling)
            total += sum(t.numel() * t.element_size() for t in live)
        return total

    @property
    def stats(self) -> ResidencyStats:
        """Residency counters (hits, loads, evictions, bytes_loaded)."""
        return self.slots.stats

    def resident(self) -> list[str]:
        """Names of the adapters whose weights are in the layers now."""
        return [self.layouts[a].name for a in self.slots.adapter_in_slot if a >= 0]

    def acquire(self, adapters) -> dict[int, int]:
        """Make `adapters` (indices) resident and pin them for a call; returns {adapter: slot}. Release with
        `release` when the call ends. Loads missing adapters from their files (least recently used evicted)."""
        with self.slots.lock:
            mapping, loads = self.slots.acquire(adapters)
            for adapter, slot, _evicted in loads:
                self._load(adapter, slot)
            if loads:
                self._refresh_groups()
        return mapping

    def release(self, adapters) -> None:
        self.slots.release(adapters)

    def slot_table(self, device: torch.device) -> torch.Tensor:
        """Slot of every adapter [A] int64 on `device` (-1 = not resident)."""
        return torch.tensor(self.slots.slot_of, dtype=torch.int64, device=device)

    def factory(self, device: torch.device, kernel_backend: str | None = None) -> GateFactory:
        """The gate factory for tensors on `device` ("triton" multi-LoRA kernel on CUDA when available)."""
        device = torch.device(device)
        backend = resolve_backend(device, kernel_backend, op="mixture_lora")
        key = (device, backend)
        factory = self._factories.get(key)
        if factory is None:
            groups = [torch.tensor(g, dtype=torch.float32, device=device) for g in self._groups]  # [A] each
            factory = self._factories[key] = GateFactory(groups, backend)
        return factory

    # ---- changes ----------------------------------------------------------------------------------------------
    def inspect(self, name: str, path: str) -> AdapterLayout:
        """Validate adapter folder `path` as `name` against this backbone (no weights read, nothing changed)."""
        return inspect_adapter(path, name, self.linear_modules(), self.module_types())

    def add(self, layouts: list[AdapterLayout]) -> None:
        """Append inspected adapters (in order): wrap the modules they target, grow every affected layer's stacks
        once, and copy each adapter's weights in from its file (read once)."""
        if not layouts:
            return
        start = len(self.layouts)
        targets = [self.slots.append_adapter() for _ in layouts]  # slot to load each into now, or -1
        total = self.slots.num_slots
        new_ranks: dict[str, int] = {}
        for layout in layouts:
            for module_name, module in layout.modules.items():
                new_ranks[module_name] = max(new_ranks.get(module_name, 0), module.rank)
        wrapped = [module_name for module_name in new_ranks if module_name not in self.layers]
        for module_name in wrapped:
            self._wrap(module_name)
        for module_name, layer in self.layers.items():
            _grow(layer, total, max(layer.lora_A.shape[1], new_ranks.get(module_name, 0)))
        self.layouts.extend(layouts)
        for offset, slot in enumerate(targets):
            if slot >= 0:
                self._load(start + offset, slot, fresh=self.slots.unlimited, on_demand=False)
        if self.slots.unlimited and not wrapped and all(len(g) == start for g in self._groups):
            self._extend_groups(start)  # O(layers x new adapters): add_adapter stays O(that adapter)
        else:
            self._refresh_groups()

    def remove(self, name: str) -> None:
        """Drop adapter `name` from every layer (the others keep their order and weights)."""
        index = self.index(name)
        slot = self.slots.remove_adapter(index)
        del self.layouts[index]
        if not self.slots.unlimited:
            if slot >= 0:
                self._clear_slot(slot)
            self._refresh_groups()
            return
        for layer in self.layers.values():
            keep = [i for i in range(len(layer.ranks)) if i != index]
            keep_t = torch.tensor(keep, dtype=torch.int64, device=layer.lora_A.device)
            layer._spare = None
            layer.lora_A = layer.lora_A.index_select(0, keep_t)
            layer.lora_B = layer.lora_B.index_select(0, keep_t)
            layer.scaling = layer.scaling.index_select(0, keep_t)
            del layer.ranks[index], layer.scalings[index]
        self._refresh_groups()

    def export(self, name: str, directory: str, base_model_name_or_path: str | None) -> tuple[str, bool]:
        """Write adapter `name` as a PEFT folder at its own rank and targets; returns (weights path, copied).

        An adapter whose source file is unchanged is copied; otherwise its weights are sliced from the stacks
        (bit-identical to what was loaded when the model's dtype can hold the file's dtype exactly).
        """
        index = self.index(name)
        layout = self.layouts[index]
        slot = self.slots.slot_of[index]
        if slot < 0:  # not resident: its file is the only copy
            return write_adapter(layout, directory, base_model_name_or_path, None)
        tensors = {key: self.backbone.get_parameter(_base_name(self.layers, parameter))
                   for key, parameter in layout.base_copies.items()}
        for module_name, module in layout.modules.items():
            layer = self.layers[module_name]
            tensors[module.key_a] = layer.lora_A[slot, : module.rank]
            tensors[module.key_b] = layer.lora_B[slot, :, : module.rank]
        return write_adapter(layout, directory, base_model_name_or_path, tensors)

    # ---- internals -------------------------------------------------------------------------------------------
    def _load(self, adapter: int, slot: int, fresh: bool = False, on_demand: bool = True) -> None:
        """Copy adapter `adapter`'s weights from its file into `slot` of every layer (other layers' rows zeroed).

        `fresh`: the slot was just allocated (all zeros), so nothing needs clearing. `on_demand` loads (a call
        needed the adapter) are counted in `stats`; filling the slots when adapters are added is not."""
        layout = self.layouts[adapter]
        if not fresh:
            self._clear_slot(slot)
        with torch.no_grad():
            for module_name, weight_a, weight_b in read_module_weights(layout):
                layer, rank = self.layers[module_name], weight_a.shape[0]
                layer.lora_A[slot, :rank].copy_(weight_a)
                layer.lora_B[slot, :, :rank].copy_(weight_b)
                layer.ranks[slot] = rank
                layer.scalings[slot] = layout.modules[module_name].scaling
                layer.scaling[slot] = layout.modules[module_name].scaling
        if on_demand:
            self.slots.stats.loads += 1
            self.slots.stats.bytes_loaded += layout.num_bytes

    def _clear_slot(self, slot: int) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()
                layer.scaling[slot] = 0.0
                layer.ranks[slot], layer.scalings[slot] = 0, 0.0

    def _wrap(self, module_name: str) -> None:
        parent_name, _, child = module_name.rpartition(".")
        parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
        layer = RoutedLoraLinear(getattr(parent, child), module_name)
        count = len(self.layouts)
        layer.ranks, layer.scalings = [0] * count, [0.0] * count
        _grow(layer, count, 0)
        setattr(parent, child, layer)
        self.layers[module_name] = layer

    def _refresh_groups(self) -> None:
        """Group layers by their scaling vector (usually one group) so gates precompute coefficients per group."""
        groups: dict[tuple[float, ...], int] = {}
        for layer in self.layers.values():
            layer.scaling_group = groups.setdefault(tuple(layer.scalings), len(groups))
        self._groups = [list(g) for g in groups] or [[]]
        self._factories.clear()

    def _extend_groups(self, start: int) -> None:
        """`_refresh_groups` after appending adapters start, start+1, ...: layers of one group stay together
        unless the new adapters' scalings split them; only the new entries are read."""
        regroup: dict[tuple[int, tuple[float, ...]], int] = {}
        values: list[list[float]] = []
        for layer in self.layers.values():
            key = (layer.scaling_group, tuple(layer.scalings[start:]))
            index = regroup.get(key)
            if index is None:
                index = regroup[key] = len(values)
                values.append(self._groups[layer.scaling_group] + list(key[1]))
            layer.scaling_group = index
        self._groups = values or [[]]
        self._factories.clear()


HEADROOM = 1.25
"""When stacks must grow by fewer adapters than they hold (add_adapter), they are reallocated with this factor of
headroom, so a sequence of add_adapter calls copies each adapter O(1) times (amortised), as a list append does."""


def _grow(layer: RoutedLoraLinear, adapters: int, rank: int) -> None:
    """Resize a layer's stacks to [adapters, rank, ...], keeping existing rows (zero padding elsewhere).

    Growing the adapter count within the reserved capacity (same rank, same device and dtype) only re-slices the
    buffers: O(1). Otherwise the stacks are reallocated: exactly `adapters` rows for a first (bulk) fill, with
    `HEADROOM` when adapters are added to a non-empty bank."""
    old_a, old_b, old_s = layer.lora_A, layer.lora_B, layer.scaling  # [A0, R0, IN], [A0, OUT, R0], [A0]
    count, old_rank = old_a.shape[0], old_a.shape[1]
    if (count, old_rank) == (adapters, rank):
        return
    spare = getattr(layer, "_spare", None)  # (A, B, scaling) storage with capacity, or None
    in_place = spare is not None and rank == old_rank and adapters <= spare[0].shape[0] and all(
        stored.data_ptr() == live.data_ptr() and stored.dtype == live.dtype  # not moved by .to() since
        for stored, live in zip(spare, (old_a, old_b, old_s), strict=True))
    if in_place:
        layer.lora_A, layer.lora_B, layer.scaling = (t[:adapters] for t in spare)
    else:
        capacity = adapters if count == 0 or adapters - count >= count else max(adapters, int(count * HEADROOM) + 1)
        new_a = old_a.new_zeros(capacity, rank, layer.in_features)  # [C, R, IN]
        new_b = old_b.new_zeros(capacity, layer.out_features, rank)  # [C, OUT, R]
        new_s = old_s.new_zeros(capacity)  # [C]
        new_a[:count, :old_rank] = old_a
        new_b[:count, :, :old_rank] = old_b
        new_s[:count] = old_s
        layer._spare = (new_a, new_b, new_s) if capacity > adapters else None
        layer.lora_A, layer.lora_B, layer.scaling = new_a[:adapters], new_b[:adapters], new_s[:adapters]
    layer.ranks.extend([0] * (adapters - len(layer.ranks)))
    layer.scalings.extend([0.0] * (adapters - len(layer.scalings)))


def _base_name(layers: dict[str, RoutedLoraLinear], parameter: str) -> str:
    """The backbone parameter name of `parameter` ("<module>.<attr>"), through a routed layer's base_layer."""
    module_name, _, attribute = parameter.rpartition(".")
    return f"{module_name}.base_layer.{attribute}" if module_name in layers else parameter
