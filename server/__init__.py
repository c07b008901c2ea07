"""gradtap.server: loads models and serves gradients over gRPC; torch lives here and only here."""
