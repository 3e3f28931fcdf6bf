"""EfficientNet-Lite0's last block(s) + conv_head + BN + classifier, built from the registry ops, against torch.

The graph engine that will run exported sub-graphs is not part of this test: a minimal local
sequencer runs the nodes in order forward and in reverse backward, summing gradients where a
tensor feeds two nodes (the residual Add). With the pretrained weights taken from the torch model,
the logits, the gradient at the cut and every parameter gradient must match torch autograd in
float32 within 1e-4 of the largest value of each tensor: what the engine has to reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from edgetune.host import create_backbone
from edgetune.runtime.ops import Op, get_op

REL = 1e-4


@dataclass
class Node:
    op: Op
    inputs: list[str]
    output: str


class Chain:
    """The local sequencer: named tensors, nodes in topological order, gradients summed at fan-out."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.params: dict[str, np.ndarray] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.count = 0

    def add(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"t{self.count}"
        op = get_op(op_type)(**attrs)
        op.needs_grad = tuple(name not in self.consts for name in inputs)
        self.nodes.append(Node(op, inputs, out))
        return out

    def param(self, name: str, value: torch.Tensor) -> str:
        self.params[name] = value.detach().numpy().astype(np.float32)
        return name

    def const(self, name: str, value) -> str:
        self.consts[name] = np.asarray(value, dtype=np.float32 if np.asarray(value).dtype.kind == "f" else None)
        return name

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = {**self.consts, **{k: v.copy() for k, v in self.params.items()}, **feeds}
        for node in self.nodes:
            values[node.output] = node.op.forward(*(values[i] for i in node.inputs))
        return values

    def backward(self, output: str, grad: np.ndarray) -> dict[str, np.ndarray]:
        grads = {output: grad}
        for node in reversed(self.nodes):
            g = grads.pop(node.output)
            for name, gi in zip(node.inputs, node.op.backward(g), strict=True):
                if gi is not None:
                    grads[name] = grads[name] + gi if name in grads else gi
        return grads


def _bn(chain: Chain, x: str, bn: nn.BatchNorm2d, name: str) -> str:
    return chain.add("BatchNormalization", [x, chain.param(f"{name}.weight", bn.weight),
                                            chain.param(f"{name}.bias", bn.bias),
                                            chain.const(f"{name}.running_mean", bn.running_mean.numpy()),
                                            chain.const(f"{name}.running_var", bn.running_var.numpy())],
                     epsilon=bn.eps, momentum=1 - bn.momentum)


def _relu6(chain: Chain, x: str) -> str:
    return chain.add("Clip", [x, "zero", "six"])


def _conv(chain: Chain, x: str, conv: nn.Conv2d, name: str) -> str:
    pad = getattr(conv, "static_padding", None)
    left, right, top, bottom = pad.padding if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
    return chain.add("Conv", [x, chain.param(f"{name}.weight", conv.weight)], group=conv.groups,
                     strides=list(conv.stride), pads=[top, left, bottom, right],
                     kernel_shape=list(conv.kernel_size))


def build(net: nn.Module, first: int) -> tuple[Chain, str]:
    """Blocks [first, 16) + conv_head + BN + ReLU6 + mean + `_fc`, as ONNX-like nodes; returns the logits' name."""
    chain = Chain()
    chain.const("zero", 0.0)
    chain.const("six", 6.0)
    chain.const("axes", np.array([2, 3], dtype=np.int64))
    x = "cut"
    for i in range(first, len(net._blocks)):
        block, name = net._blocks[i], f"_blocks.{i}"
        args = block._block_args
        h = x
        if args.expand_ratio != 1:
            h = _relu6(chain, _bn(chain, _conv(chain, h, block._expand_conv, f"{name}._expand_conv"), block._bn0,
                                  f"{name}._bn0"))
        h = _relu6(chain, _bn(chain, _conv(chain, h, block._depthwise_conv, f"{name}._depthwise_conv"), block._bn1,
                              f"{name}._bn1"))
        h = _bn(chain, _conv(chain, h, block._project_conv, f"{name}._project_conv"), block._bn2, f"{name}._bn2")
        if args.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
            h = chain.add("Add", [h, x])  # x feeds this node and the block's first conv: fan-out
        x = h
    x = _relu6(chain, _bn(chain, _conv(chain, x, net._conv_head, "_conv_head"), net._bn1, "_bn1"))
    return chain, chain.add("ReduceMean", [x, "axes"], keepdims=1)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    net, _ = create_backbone("efficientnet-lite0")
    return net


@pytest.mark.parametrize("first", [15, 11], ids=["last-block", "last-stage"])
def test_lite0_tail_forward_and_backward_match_torch(lite0, first):
    net = lite0
    chain, pooled = build(net, first)
    channels = net._blocks[first]._block_args.input_filters
    size = 7 if first == 15 else 14
    rng = np.random.default_rng(first)
    cut = rng.standard_normal((4, channels, size, size)).astype(np.float32)
    fc_w, fc_b = net._fc.weight.detach().numpy(), net._fc.bias.detach().numpy()
    upstream = rng.standard_normal((4, fc_w.shape[0])).astype(np.float32)

    values = chain.forward({"cut": cut})
    features = values[pooled].reshape(4, -1)  # the local stand-ins for Flatten and Gemm (not this file's ops)
    logits = features @ fc_w.T + fc_b
    grads = chain.backward(pooled, (upstream @ fc_w).reshape(values[pooled].shape))

    x = torch.tensor(cut, requires_grad=True)
    h = x
    for block in list(net._blocks)[first:]:
        h = block(h)
    want = net._fc(net._avg_pooling(net._swish(net._bn1(net._conv_head(h)))).flatten(1))
    net.zero_grad()
    want.backward(torch.tensor(upstream))

    def close(got: np.ndarray, ref: torch.Tensor, what: str) -> None:
        ref = ref.detach().numpy()
        assert got.shape == ref.shape, what
        assert np.abs(got - ref).max() <= REL * np.abs(ref).max(), (what, np.abs(got - ref).max(), np.abs(ref).max())

    close(logits, want, "logits")
    close(grads["cut"], x.grad, "gradient at the cut")
    torch_params = dict(net.named_parameters())
    assert len(chain.params) == sum(1 for n in torch_params if n.startswith(tuple(
        [f"_blocks.{i}." for i in range(first, 16)] + ["_conv_head.", "_bn1."])))
    for name in chain.params:
        close(grads[name], torch_params[name].grad, name)
    assert not set(grads) - set(chain.params) - {"cut"}  # constants and buffers get no gradient
