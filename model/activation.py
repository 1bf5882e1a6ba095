"""The feed-forward activations by config name, shared by the dense FFN and the experts."""
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "gelu": nn.GELU}
