"""Helpers shared by several test modules (no test module imports another)."""


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
