"""The transport's hand-encoded chunks are exactly protobuf's bytes, and decode back exactly."""

from __future__ import annotations

import numpy as np
import pytest
from gradtap.client._assemble import decode_response
from gradtap.client._frames import RawChunk
from gradtap.server.wire.frames import encode_chunk

from gradtap.v1 import gradtap_pb2 as pb


@pytest.mark.parametrize(
    ("tensor_id", "offset", "size"),
    [(0, 0, 1 << 20), (1, 0, 5), (3, 1 << 20, 1 << 20), (300, (1 << 40) + 7, 17)],
)
def test_hand_encoded_chunks_equal_protobuf_encoding(
    tensor_id: int, offset: int, size: int
) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    ours = encode_chunk(2, tensor_id, offset, memoryview(data))
    reference = pb.AnalyzeResponse(
        chunks=[pb.TensorChunk(tensor_id=tensor_id, offset=offset, data=data)]
    )
    assert pb.AnalyzeResponse.FromString(ours) == reference
    decoded = decode_response(ours)
    assert isinstance(decoded, RawChunk)
    assert (decoded.tensor_id, decoded.offset, bytes(decoded.data)) == (tensor_id, offset, data)
    decoded_reference = decode_response(reference.SerializeToString())
    assert isinstance(decoded_reference, RawChunk) and bytes(decoded_reference.data) == data


def test_messages_other_than_a_lone_chunk_take_the_protobuf_path() -> None:
    message = pb.AnalyzeResponse(
        chunks=[pb.TensorChunk(tensor_id=0, data=b"ab"), pb.TensorChunk(tensor_id=1, data=b"c")]
    )
    message.summary.loss = 1.5
    decoded = decode_response(message.SerializeToString())
    assert decoded == message
    header_only = pb.AnalyzeResponse(header=pb.AnalyzeHeader(total_bytes=3))
    assert decode_response(header_only.SerializeToString()) == header_only
