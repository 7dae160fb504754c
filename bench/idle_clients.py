"""Opens N client connections to a Postgres-speaking server, runs one statement on each, and
keeps them all open and idle until stdin closes. Prints "ready N" once every connection has
answered. Raw protocol (no driver): a driver's own per-connection memory would not matter
here, and 10 000 connections must fit in one small process.

Usage: python3 bench/idle_clients.py HOST PORT USER DATABASE N
"""
import asyncio
import os
import struct
import sys


def startup(user, database):
    body = struct.pack("!i", 196608) + b"".join(k + b"\0" + v.encode() + b"\0" for k, v in
                                                 ((b"user", user), (b"database", database))) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def query(sql):
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


async def until_ready(reader):
    while True:
        tag = await reader.readexactly(1)
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        body = await reader.readexactly(length - 4)
        if tag == b"E":
            raise RuntimeError(body)
        if tag == b"R" and struct.unpack("!i", body[:4])[0] not in (0,):
            raise RuntimeError("the server asks for a password; run it with trust authentication")
        if tag == b"Z":
            return


async def one(host, port, user, database):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(startup(user, database))
    await until_ready(reader)
    if os.environ.get("IDLE_QUERY", "1") == "1":
        writer.write(query("SELECT 1"))
        await until_ready(reader)
    return reader, writer


async def main():
    host, port, user, database, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    conns = []
    for start in range(0, n, 200):
        conns += await asyncio.gather(*(one(host, port, user, database) for _ in range(start, min(n, start + 200))))
    print("ready", len(conns), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, w in conns:
        w.close()


asyncio.run(main())
