"""Hostile clients for bench/hostile.sh, on raw sockets (no driver in the way).

  pipeline HOST PORT N   one client pipelines N cached 100 kB results and never reads
  logins HOST PORT N C   N SCRAM log-ins as roles that do not exist, C at a time
"""
import base64
import os
import socket
import struct
import sys
import threading
import time


def msg(tag, body):
    return tag + struct.pack("!I", len(body) + 4) + body


def startup(user):
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0postgres\0\0"
    return struct.pack("!I", len(body) + 4) + body


def read_msg(s):
    head = b""
    while len(head) < 5:
        chunk = s.recv(5 - len(head))
        if not chunk:
            return None, b""
        head += chunk
    n = struct.unpack("!I", head[1:5])[0] - 4
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return head[:1], body


def pipeline(host, port, n):
    s = socket.create_connection((host, port))
    s.sendall(startup("postgres"))
    while read_msg(s)[0] != b"Z":
        pass
    q = msg(b"Q", b"SELECT repeat('x', 100000) AS big\0")
    for _ in range(2):  # cache it
        s.sendall(q)
        while read_msg(s)[0] != b"Z":
            pass
    print("warm", flush=True)
    sys.stdin.readline()
    s.setblocking(False)
    data, sent, started = q * n, 0, time.time()
    while sent < len(data) and time.time() - started < 5:
        try:
            sent += s.send(data[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    print(f"sent {sent * 100 // len(data)}% of {n} queries", flush=True)
    sys.stdin.readline()
    s.close()


def one_login(host, port, user):
    s = socket.create_connection((host, port))
    try:
        s.sendall(startup(user))
        tag, body = read_msg(s)
        if tag != b"R":
            return False
        nonce = base64.b64encode(os.urandom(18)).decode()
        first = f"n,,n=,r={nonce}".encode()
        s.sendall(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
        tag, body = read_msg(s)
        server_first = body[4:].decode()
        final = f"c=biws,r={server_first.split(',')[0][2:]},p={base64.b64encode(os.urandom(32)).decode()}"
        s.sendall(msg(b"p", final.encode()))
        tag, body = read_msg(s)
        return tag == b"E" and b"28P01" in body
    finally:
        s.close()


def logins(host, port, n, concurrency):
    done, refused, lock = [0], [0], threading.Lock()

    def worker(k):
        for i in range(k, n, concurrency):
            ok = one_login(host, port, f"nobody_{i}")
            with lock:
                done[0] += 1
                refused[0] += ok

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{done[0]} log-ins, {refused[0]} refused with 28P01", flush=True)


if __name__ == "__main__":
    what, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if what == "pipeline":
        pipeline(host, port, int(sys.argv[4]))
    else:
        logins(host, port, int(sys.argv[4]), int(sys.argv[5]))
