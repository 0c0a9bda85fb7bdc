"""Graph rewrites for inference: the extraction pass's copy of a frozen backbone (inference_model), with each
BatchNorm folded into its convolution, activations in place where safe and symmetric pads merged (torch.fx).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
import torch.nn.utils.fusion
from torch import nn

log = logging.getLogger(__name__)


class _ConvLeafTracer(torch.fx.Tracer):
    """Keeps every Conv2d (EfficientNet's padding subclass too) one graph node, so a BatchNorm after it is found."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)


def inference_model(model: nn.Module) -> nn.Module:
    """A copy of a frozen eval-mode backbone that computes the same features with fewer passes over memory.

    On CPU the backbone pass is memory-bound: each BatchNorm, clamp and pad reads and writes a whole
    activation. So: every BatchNorm is folded into the convolution before it (exact up to float rounding,
    about 1e-5 on efficientnet_lite0's features, because the statistics are frozen); activations whose input
    nothing else reads run in place; a symmetric zero pad becomes the convolution's own padding. A model
    torch.fx cannot trace is returned unchanged: this is a speed-up, never a requirement.
    """
    model = copy.deepcopy(model).eval()
    try:
        graph_module = torch.fx.GraphModule(model, _ConvLeafTracer().trace(model))
    except Exception as error:  # tracing fails in many ways on dynamic control flow; fall back, never fail
        log.debug("backbone not traceable (%s); extracting with the unfused model", error)
        return model
    graph, modules = graph_module.graph, dict(graph_module.named_modules())
    for node in list(graph.nodes):
        source = node.args[0] if node.args else None
        if not (_calls(node, modules, nn.BatchNorm2d) and _calls(source, modules, nn.Conv2d)
                and len(source.users) == 1 and modules[node.target].track_running_stats):
            continue
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(modules[source.target], modules[node.target])
        parent, _, name = source.target.rpartition(".")
        setattr(graph_module.get_submodule(parent), name, fused)
        modules[source.target] = fused
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    # One activation module is often called at several places (EfficientNet's _swish): in place only if
    # every call's input is a fresh tensor that call alone reads.
    calls: dict[str, list[bool]] = {}
    for node in graph.nodes:
        if _calls(node, modules, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            source = node.args[0]
            fresh = _calls(source, modules, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))  # not an input or a view
            calls.setdefault(node.target, []).append(fresh and len(source.users) == 1)
    for target, alone in calls.items():
        modules[target].inplace = all(alone)
    for module in graph_module.modules():
        pad = getattr(module, "static_padding", None)  # efficientnet_lite_pytorch's TensorFlow-style SAME padding
        if isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and module.padding == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding, module.static_padding = (top, left), nn.Identity()
    graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    return graph_module.to(memory_format=torch.channels_last)


def _calls(node, modules: dict, kind) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(modules[node.target], kind)
