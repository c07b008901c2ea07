"""The plain-socket baseline's server: sends N bytes from memory for each 8-byte request N.

Run as `python -m bench._socket_server MAX_BYTES`; prints `socket serving on HOST:PORT`.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading


def _serve(conn: socket.socket, payload: memoryview) -> None:
    with conn:
        while True:
            request = b""
            while len(request) < 8:
                more = conn.recv(8 - len(request))
                if not more:
                    return
                request += more
            (size,) = struct.unpack("<Q", request)
            if size == 0 or size > len(payload):
                return
            conn.sendall(payload[:size])


def main() -> None:
    max_bytes = int(sys.argv[1])
    payload = memoryview(bytearray(b"\x01") * max_bytes)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    host, port = listener.getsockname()
    print(f"socket serving on {host}:{port}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn, payload), daemon=True).start()


if __name__ == "__main__":
    main()
