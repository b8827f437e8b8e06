#!/usr/bin/env python3
"""An endpoint that first looks like llama-server's /metrics, then misbehaves.

Usage: bad-engine.py MODE_FILE COUNT_DIR PORT:KIND [PORT:KIND ...]
KIND is `hang`, `garbage` or `huge`. While MODE_FILE holds `good`, every port answers with
llama.cpp metric families; once it holds `bad`, a `hang` port reads the request and never
answers, a `garbage` port answers with bytes that are not HTTP, a `huge` port answers 200 and
streams an endless body (gigabytes, if the client kept reading). Each request is counted in
COUNT_DIR/<port> (one line per request), so a test can see how often the agent came back.
"""
import socket
import sys
import threading
import time

GOOD = (
    "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 1\n"
    "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n"
    "# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 10\n"
).encode()


def serve(port, kind, mode_file, count_dir):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=answer, args=(conn, port, kind, mode_file, count_dir), daemon=True).start()


def answer(conn, port, kind, mode_file, count_dir):
    try:
        conn.recv(4096)
        with open(f"{count_dir}/{port}", "a") as f:
            f.write(f"{time.time()}\n")
        with open(mode_file) as f:
            mode = f.read().strip()
        if mode == "good":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(GOOD) + GOOD)
        elif kind == "hang":
            time.sleep(3600)
        elif kind == "garbage":
            conn.sendall(bytes(range(256)) * 64)
        elif kind == "huge":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
            chunk = b"llamacpp:requests_deferred 1\n" * 4096
            while True:
                conn.sendall(chunk)
    except OSError:
        pass
    finally:
        conn.close()


def main():
    mode_file, count_dir = sys.argv[1], sys.argv[2]
    for spec in sys.argv[3:]:
        port, kind = spec.split(":")
        threading.Thread(target=serve, args=(int(port), kind, mode_file, count_dir), daemon=True).start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
