"""The gRPC layer, the only code that imports grpc: the server process, the thin servicer,
the interceptors, and exceptions mapped to status codes in one place (status.py)."""
