"""`LoraBank`: every adapter's LoRA weights, held once, in the routed layers of one backbone.

The bank swaps a `RoutedLoraLinear` in for every linear module that at least one adapter targets, fills the
layers' stacked buffers straight from the adapters' safetensors files (`peft_files`), keeps the adapters in
router order, and builds the `GateFactory` the call plans use. Loading N adapters reads each file once and
allocates every layer's stacks once: O(total adapter bytes), never O(N^2) as injecting them one by one into
PEFT is.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import resolve_backend
from .gate import GateFactory
from .layer import RoutedLoraLinear
from .peft_files import AdapterLayout, inspect_adapter, read_module_weights, write_adapter


class LoraBank:
    """The adapters of one routed model, in router order (index a = `names[a]`), and the layers holding them."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.layouts: list[AdapterLayout] = []
        self.layers: dict[str, RoutedLoraLinear] = {}
        for name, module in backbone.named_modules():
            if isinstance(module, RoutedLoraLinear):
                self.layers[name] = module
        self._factories: dict[tuple, GateFactory] = {}
        self._groups: list[tuple[float, ...]] = []

    # ---- queries --------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [layout.name for layout in self.layouts]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def layout(self, name: str) -> AdapterLayout:
        return self.layouts[self.index(name)]

    def linear_modules(self) -> dict[str, nn.Module]:
        """Backbone module name -> linear layer LoRA can target (routed layers stand for their base layer)."""
        modules: dict[str, nn.Module] = dict(self.layers)
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.Linear) and name.rpartition(".")[0] not in self.layers:
                modules[name] = module
        return modules

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
        return inspect_adapter(path, name, self.linear_modules())

    def add(self, layouts: list[AdapterLayout]) -> None:
        """Append inspected adapters (in order): wrap the modules they target, grow every affected layer's stacks
        once, and copy each adapter's weights in from its file (read once)."""
        if not layouts:
            return
        start = len(self.layouts)
        total = start + len(layouts)
        new_ranks: dict[str, int] = {}
        for layout in layouts:
            for module_name, module in layout.modules.items():
                new_ranks[module_name] = max(new_ranks.get(module_name, 0), module.rank)
        for module_name in new_ranks:
            if module_name not in self.layers:
                self._wrap(module_name)
        for module_name, layer in self.layers.items():
            _grow(layer, total, max(layer.lora_A.shape[1], new_ranks.get(module_name, 0)))
        for offset, layout in enumerate(layouts):
            index = start + offset
            with torch.no_grad():
                for module_name, weight_a, weight_b in read_module_weights(layout):
                    layer, rank = self.layers[module_name], weight_a.shape[0]
                    layer.lora_A[index, :rank].copy_(weight_a)
                    layer.lora_B[index, :, :rank].copy_(weight_b)
                    layer.ranks[index] = rank
                    layer.scalings[index] = layout.modules[module_name].scaling
                    layer.scaling[index] = layout.modules[module_name].scaling
        self.layouts.extend(layouts)
        self._refresh_groups()

    def remove(self, name: str) -> None:
        """Drop adapter `name` from every layer (the others keep their order and weights)."""
        index = self.index(name)
        for layer in self.layers.values():
            keep = [i for i in range(len(layer.ranks)) if i != index]
            keep_t = torch.tensor(keep, dtype=torch.int64, device=layer.lora_A.device)
            layer._spare = None
            layer.lora_A = layer.lora_A.index_select(0, keep_t)
            layer.lora_B = layer.lora_B.index_select(0, keep_t)
            layer.scaling = layer.scaling.index_select(0, keep_t)
            del layer.ranks[index], layer.scalings[index]
        del self.layouts[index]
        self._refresh_groups()

    def export(self, name: str, directory: str, base_model_name_or_path: str | None) -> tuple[str, bool]:
        """Write adapter `name` as a PEFT folder at its own rank and targets; returns (weights path, copied).

        An adapter whose source file is unchanged is copied; otherwise its weights are sliced from the stacks
        (bit-identical to what was loaded when the model's dtype can hold the file's dtype exactly).
        """
        index = self.index(name)
        layout = self.layouts[index]
        tensors = {key: self.backbone.get_parameter(_base_name(self.layers, parameter))
                   for key, parameter in layout.base_copies.items()}
        for module_name, module in layout.modules.items():
            layer = self.layers[module_name]
            tensors[module.key_a] = layer.lora_A[index, : module.rank]
            tensors[module.key_b] = layer.lora_B[index, :, : module.rank]
        return write_adapter(layout, directory, base_model_name_or_path, tensors)

    # ---- internals -------------------------------------------------------------------------------------------
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
        self._groups = list(groups) or [()]
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
