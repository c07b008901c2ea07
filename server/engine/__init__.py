"""The engine: pure torch. Graph capture, objectives, reductions, batching, attribution and
adversarial loops. It imports neither grpc nor the contract's protobuf messages."""
