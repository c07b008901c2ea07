"""The wire: protobuf messages to the engine's objects and back, for every RPC. Requests are
checked in full before any tensor is allocated. No grpc here."""
