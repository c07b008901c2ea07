"""gradtap: the activations and gradients of a PyTorch model's intermediate nodes, over gRPC."""

__version__ = "0.1.0"
