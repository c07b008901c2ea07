"""Generated gRPC contract for gradtap.v1 (do not edit; run scripts/gen_proto.py)."""
