"""Peak memory of tensors a block of PyTorch code allocates, on any device (CPU included).

torch.cuda.max_memory_allocated has no CPU counterpart, and the process's peak RSS depends on the
allocator's caching; torch's MemTracker refuses modules called more than once per step (a shared
unembedding serving several heads is). This mode sees every operator's output, counts each new
storage's bytes until the storage is freed, and keeps the maximum: autograd's saved tensors, gradients
and temporaries, exactly. Storages that existed before (weights, inputs) and views of them are not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class PeakTensorMemory(TorchDispatchMode):
    """`with PeakTensorMemory() as memory: ...`, then `memory.peak_bytes` (and `memory.current_bytes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._counted: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.current_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            nbytes = storage.nbytes()
            if nbytes == 0 or storage.data_ptr() in inputs or storage in self._counted:
                continue  # a view of, or in-place on, storage that already existed
            self._counted[storage] = nbytes
            self.current_bytes += nbytes
            weakref.finalize(storage, self._freed, nbytes)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out
