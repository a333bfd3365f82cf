"""Helpers shared by several test modules (no test module imports another)."""

import json

import torch


class CountingBackend:
    """A torch.compile backend that records every graph it is handed and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    @property
    def count(self):
        return len(self.graphs)


def installer_originals(names) -> dict:
    """What a checkpoint's own copies of our files hold in the installer tests (name -> bytes)."""
    return {name: f"# the checkpoint's original {name}\n".encode() for name in names}


def write_installer_checkpoint(directory, names, config: dict):
    """A checkpoint folder for the installer tests: ``config`` as its config.json and the
    checkpoint's own copies of our files (:func:`installer_originals`)."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    for name, data in installer_originals(names).items():
        (directory / name).write_bytes(data)
    return directory


def write_our_stand_ins(directory, names):
    """Stand-ins for our files, so the installer tests do not depend on the real ones' contents."""
    directory.mkdir()
    for name in names:
        (directory / name).write_bytes(f"# our fast {name}\n".encode())
    return directory


def quantized_layer(in_features, out_features, bits, group, dtype, kernel, seed=0):
    """A QuantizedLinear from a random nn.Linear (weights and bias * 0.05, seeded) with its
    ``kernel_option`` set."""
    import modeling_chatglm as M

    linear = torch.nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.05)
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator) * 0.05)
    layer = M.QuantizedLinear.from_linear(linear.to(dtype), bits, group)
    layer.kernel_option = kernel
    return layer
