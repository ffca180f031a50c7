"""The demo's networks: the classic deep sigmoid vs ReLU vs residual experiment, one
builder per network.

Each :class:`DemoNet` pairs a model with the learning rate the demo trains it at and
what gradwatch is expected to find. The models are plain ``nn.Module``\\ s, usable
on their own:

>>> import torch
>>> from gradwatch.demo.nets import NETS, get_net, sigmoid_mlp
>>> model = sigmoid_mlp()
>>> sum(isinstance(m, torch.nn.Linear) for m in model.modules())
30
>>> model(torch.randn(2, 64)).shape
torch.Size([2, 10])
>>> [net.name for net in NETS][:2]
['sigmoid', 'relu-default-init']
>>> get_net("relu-kaiming").expect_findings
False
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

#: Digits images are 8x8 pixels; ten classes.
INPUTS = 64
CLASSES = 10
WIDTH = 64
#: The classic experiment's depth: 30 weight layers.
DEPTH = 30


def mlp(
    depth: int = DEPTH,
    activation: Callable[[], nn.Module] = nn.ReLU,
    *,
    init: str = "default",
    width: int = WIDTH,
    inputs: int = INPUTS,
    outputs: int = CLASSES,
) -> nn.Sequential:
    """``depth`` Linear layers with ``activation`` between them (none after the last).

    Layers are named ``linear1 .. linearN`` and ``act1 .. act{N-1}`` so that findings
    read as English. ``init`` is ``"default"`` (PyTorch's: uniform, gain ~0.58) or
    ``"kaiming"`` (He normal for ReLU, gain sqrt(2), zero biases).

    >>> [name for name, _ in mlp(3).named_children()]
    ['linear1', 'act1', 'linear2', 'act2', 'linear3']
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if init not in ("default", "kaiming"):
        raise ValueError(f"init must be 'default' or 'kaiming', got {init!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    fan_in = inputs
    for i in range(1, depth + 1):
        fan_out = outputs if i == depth else width
        linear = nn.Linear(fan_in, fan_out)
        if init == "kaiming":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers[f"linear{i}"] = linear
        if i < depth:
            layers[f"act{i}"] = activation()
        fan_in = fan_out
    return nn.Sequential(layers)


class ResidualBlock(nn.Module):
    """``out = h + activation(linear(h))``: the identity path adds 1 to the derivative,
    so the gradient reaches earlier blocks even where the activation's derivative is ~0."""

    def __init__(self, width: int = WIDTH, activation: Callable[[], nn.Module] = nn.Sigmoid):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = activation()

    def forward(self, h: Tensor) -> Tensor:
        return h + self.act(self.linear(h))


class ResidualMLP(nn.Module):
    """A ``stem`` Linear, ``depth - 2`` :class:`ResidualBlock`\\ s and a ``head`` Linear:
    ``depth`` weight layers in all, like :func:`mlp`.

    >>> import torch
    >>> ResidualMLP(depth=4)(torch.randn(3, 64)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self,
        depth: int = DEPTH,
        activation: Callable[[], nn.Module] = nn.Sigmoid,
        *,
        width: int = WIDTH,
        inputs: int = INPUTS,
        outputs: int = CLASSES,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (stem and head), got {depth}")
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, activation) for _ in range(depth - 2)))
        self.head = nn.Linear(width, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def sigmoid_mlp() -> nn.Sequential:
    """30 Linear layers with sigmoid between them, PyTorch's default init."""
    return mlp(DEPTH, nn.Sigmoid)


def relu_mlp(init: str = "default") -> nn.Sequential:
    """30 Linear layers with ReLU between them."""
    return mlp(DEPTH, nn.ReLU, init=init)


def residual_sigmoid_mlp() -> ResidualMLP:
    """The 30-layer sigmoid network with a residual connection around each hidden layer."""
    return ResidualMLP(DEPTH, nn.Sigmoid)


#: The network pushed by a large learning rate: shallow, so depth is not the problem.
SHALLOW_DEPTH = 4
#: Large enough that the units die within the first steps, so that the outcome is decided
#: by the initialisation and the first batches. At a rate that kills them slowly (0.8),
#: a hundred steps of high-rate training magnify rounding differences (thread count,
#: BLAS build) until the dead share lands on either side of the rule's threshold:
#: 5 of 8 seeds changed findings between 1 and 2 threads there, none at this rate.
HIGH_LR = 2.0
#: The LeakyReLU twin's slope below zero. PyTorch's default, 0.01, also keeps every unit
#: alive, but at this rate it learns little (~70%); 0.1 carries enough gradient to learn.
LEAKY_SLOPE = 0.1


def leaky_relu() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_SLOPE)


def shallow_mlp(activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """4 Linear layers (3 hidden layers of 64 units), kaiming init."""
    return mlp(SHALLOW_DEPTH, activation, init="kaiming")


@dataclass(frozen=True)
class DemoNet:
    """One network of the demo, how it is trained and what gradwatch should say."""

    name: str
    label: str  # a few words: depth, activation, what is special
    build: Callable[[], nn.Module]
    lr: float
    expect_findings: bool
    lesson: str  # one sentence: what this network shows


NETS: tuple[DemoNet, ...] = (
    DemoNet(
        name="sigmoid",
        label="30 sigmoid layers",
        build=sigmoid_mlp,
        lr=0.1,
        expect_findings=True,
        lesson="sigmoid's derivative is at most 0.25: after 30 layers the first gets 0",
    ),
    DemoNet(
        name="relu-default-init",
        label="30 ReLU layers, default init",
        build=relu_mlp,
        lr=0.05,
        expect_findings=True,
        lesson="ReLU alone is not enough: default init shrinks the gradient at every layer",
    ),
    DemoNet(
        name="relu-kaiming",
        label="30 ReLU layers, kaiming init",
        build=lambda: relu_mlp("kaiming"),
        lr=0.05,
        expect_findings=False,
        lesson="the same ReLU net with He (kaiming) init keeps the gradient and learns",
    ),
    DemoNet(
        name="sigmoid-residual",
        label="30 sigmoid layers, residual",
        build=residual_sigmoid_mlp,
        lr=0.1,
        expect_findings=False,
        lesson="out = h + sigmoid(Wh): the +1 path keeps the gradient alive",
    ),
    DemoNet(
        name="relu-high-lr",
        label="4 ReLU layers, large lr",
        build=shallow_mlp,
        lr=HIGH_LR,
        expect_findings=True,
        lesson="a large learning rate pushes ReLU units below zero for every input: dead",
    ),
    DemoNet(
        name="leaky-high-lr",
        label=f"4 LeakyReLU({LEAKY_SLOPE:g}) layers, large lr",
        build=lambda: shallow_mlp(leaky_relu),
        lr=HIGH_LR,
        expect_findings=False,
        lesson="LeakyReLU keeps a gradient below zero (0.1x), so units cannot die",
    ),
)


def net_names() -> list[str]:
    """The names ``--only`` accepts, in demo order."""
    return [net.name for net in NETS]


def get_net(name: str) -> DemoNet:
    """The demo network called ``name``; a ValueError lists the valid names."""
    for net in NETS:
        if net.name == name:
            return net
    raise ValueError(f"unknown network {name!r}; valid names: {', '.join(net_names())}")
