"""Block swap: keep the last N transformer blocks of a WanDiT on an offload device (the CPU) and bring each in
just before it runs, so a 14B model fits a smaller GPU.

    swap = BlockSwap(model, blocks_to_swap=20)      # blocks 20..39 of 40 stay on the CPU (pinned)
    model.to("cuda")                                # moves everything else; the swapped blocks stay put
    model(x, t, context)                            # each swapped block is copied in, run, dropped

How it runs (forward pre/post hooks on the blocks, so every caller of the blocks — WanDiT.forward, the step
cache — gets it):
  * the offload copy of each swapped block is the master (pinned host memory when CUDA is available);
    loading a block copies its tensors to the device of the rest of the model (`model.device`) and puts the
    copies in the block's parameter slots; after the block ran the masters are put back and the copies are
    dropped — weights never change during inference, so nothing is copied back;
  * on CUDA the copies are made on a side stream, `non_blocking` from pinned memory: the first swapped block
    is prefetched when block 0 starts, and while swapped block i runs the next swapped block is copied in,
    so at most two swapped blocks are on the GPU at a time. The compute stream waits on the copy's event
    before using it, and the copies are recorded on the compute stream before they are dropped;
  * on any other device the same code path runs synchronously (a real copy, even CPU to CPU).

With ComfyUI's own offloading: the swapped blocks ignore device moves (`Module.to` / `.cuda()` on them or on
any module above them is a no-op for their tensors), so ComfyUI's ModelPatcher moves only the resident part
when it loads the model to the GPU and when it offloads it; give it `resident_bytes(model)` as its size so
its memory planning counts only what really lands on the load device (nodes/wan.py does this). ComfyUI's
low-VRAM partial loading then works on the resident part only. A swapped model cannot be cast to another
dtype afterwards (load it in the wanted weight dtype instead) and LoRA patches on swapped blocks are not
supported.
"""
import types

import torch


def _noop_apply(self, fn, recurse=True):
    return self


class _Slot:
    def __init__(self, index, block):
        self.index, self.block = index, block
        self.entries = []    # (module, kind, name, master tensor)
        self.copies = None   # tensors on the load device while loaded / in flight
        self.device = None
        self.event = None


class BlockSwap:
    """Swap the last `blocks_to_swap` blocks of `model` (a WanDiT) between `offload_device` and the device of
    the rest of the model. `remove()` undoes the hooks (the blocks stay on the offload device).
    Counters: `loads` (block copies made), `prefetched` (of them issued ahead of use)."""

    def __init__(self, model, blocks_to_swap, offload_device="cpu", pin_memory=None, asynchronous=True):
        n = int(blocks_to_swap)
        layers = len(model.blocks)
        if not 0 <= n <= layers:
            raise ValueError(f"blocks_to_swap must be between 0 and the model's {layers} blocks, got {n}")
        if getattr(model, "_block_swap", None) is not None:
            raise ValueError("this model already has block swap installed; remove() it first")
        self.model = model
        self.offload_device = torch.device(offload_device)
        if pin_memory is None:
            pin_memory = self.offload_device.type == "cpu" and torch.cuda.is_available()
        self.asynchronous = asynchronous
        self.swapped = list(range(layers - n, layers))
        self.slots = {}
        self.loads = 0
        self.prefetched = 0
        self._streams = {}
        self._handles = []
        self._saved_apply = []
        for i in self.swapped:
            block = model.blocks[i]
            slot = _Slot(i, block)
            for module in block.modules():
                for kind, table in (("p", module._parameters), ("b", module._buffers)):
                    for name, t in table.items():
                        if t is None:
                            continue
                        master = t.detach().to(self.offload_device)
                        if pin_memory and master.device.type == "cpu":
                            master = master.pin_memory()
                        if kind == "p":
                            master = torch.nn.Parameter(master, requires_grad=t.requires_grad)
                        table[name] = master
                        slot.entries.append((module, kind, name, master))
                # ComfyUI / Module.to: leave this block's tensors where they are
                self._saved_apply.append((module, module.__dict__.get("_apply")))
                module._apply = types.MethodType(_noop_apply, module)
            self.slots[i] = slot
        if n:
            self._handles.append(model.blocks[0].register_forward_pre_hook(self._on_first_block))
            for i in self.swapped:
                self._handles.append(model.blocks[i].register_forward_pre_hook(self._before(i)))
                self._handles.append(model.blocks[i].register_forward_hook(self._after(i)))
        model._block_swap = self

    # -- sizes ------------------------------------------------------------------------------------------
    def swapped_bytes(self):
        return sum(m.numel() * m.element_size() for s in self.slots.values() for _, _, _, m in s.entries)

    # -- moving -----------------------------------------------------------------------------------------
    def _side_stream(self, device):
        key = str(device)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]

    def _load(self, i, ahead=False):
        slot = self.slots[i]
        if slot.copies is not None:
            return
        device = self.model.device
        masters = [m for _, _, _, m in slot.entries]
        if device.type == "cuda" and self.asynchronous:
            side = self._side_stream(device)
            with torch.cuda.stream(side):
                slot.copies = [m.detach().to(device, non_blocking=True) for m in masters]
                slot.event = torch.cuda.Event()
                slot.event.record(side)
        else:
            slot.copies = [m.detach().to(device, copy=True) for m in masters]
            slot.event = None
        slot.device = device
        self.loads += 1
        self.prefetched += int(ahead)

    def _install(self, slot):
        if slot.event is not None:
            compute = torch.cuda.current_stream(slot.device)
            compute.wait_event(slot.event)
            for c in slot.copies:
                c.record_stream(compute)  # the allocator must not reuse them before this stream is done
            slot.event = None
        for (module, kind, name, _), c in zip(slot.entries, slot.copies):
            (module._parameters if kind == "p" else module._buffers)[name] = c

    def _release(self, slot):
        for module, kind, name, master in slot.entries:
            (module._parameters if kind == "p" else module._buffers)[name] = master
        slot.copies = None
        slot.device = None

    # -- hooks ------------------------------------------------------------------------------------------
    def _on_first_block(self, module, args):
        first = self.swapped[0]
        if first != 0:
            self._load(first, ahead=True)

    def _before(self, i):
        k = self.swapped.index(i)
        nxt = self.swapped[k + 1] if k + 1 < len(self.swapped) else None

        def hook(module, args):
            slot = self.slots[i]
            if slot.copies is not None and slot.device != self.model.device:
                self._release(slot)  # prefetched for another device (the model was moved since)
            self._load(i)
            self._install(slot)
            if nxt is not None:
                self._load(nxt, ahead=True)
        return hook

    def _after(self, i):
        def hook(module, args, output):
            self._release(self.slots[i])
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        for slot in self.slots.values():
            self._release(slot)
        for module, saved in self._saved_apply:
            if saved is None:
                module.__dict__.pop("_apply", None)
            else:
                module._apply = saved
        self._saved_apply = []
        self.model._block_swap = None


def resident_bytes(model):
    """Bytes of parameters and buffers that live on the load device (everything but swapped blocks)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    swap = getattr(model, "_block_swap", None)
    return total - (swap.swapped_bytes() if swap is not None else 0)
