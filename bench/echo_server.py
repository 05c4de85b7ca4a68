"""The loopback floor for bench/run server: a minimal Python socket server that answers every
HTTP request with a fixed 2-byte body, no parsing beyond the blank line (one connection)."""
import socket
import sys

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"
buf = b""
while True:
    data = c.recv(65536)
    if not data:
        sys.exit(0)
    buf += data
    while b"\r\n\r\n" in buf:
        buf = buf[buf.index(b"\r\n\r\n") + 4:]
        c.sendall(reply)
