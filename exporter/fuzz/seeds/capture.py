#!/usr/bin/env python3
"""Captures the seed corpus: real DNS responses from dnsmasq on loopback.

Run as `python3 capture.py OUTDIR` with dnsmasq installed (Debian package
`dnsmasq-base`). Starts dnsmasq on 127.0.0.1 with local data only (no
upstream servers, nothing leaves loopback), asks it questions over UDP and
TCP and writes each raw response as the kernel would hand it to the agent:
`udp-*.bin` is the DNS message, `tcp-*.bin` the TCP payload with its 2-byte
length prefix.
"""
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

PORT = 53535
HOSTS = """\
192.0.2.10 example.test
2001:db8::10 example.test
192.0.2.21 multi.test
192.0.2.22 multi.test
192.0.2.23 multi.test
2001:db8::21 multi.test
198.51.100.7 cdn-one.test
198.51.100.7 cdn-two.test
""" + "".join(f"203.0.113.{i} big.test\n" for i in range(1, 81))


def query(qid, name, qtype, rd=True):
    header = struct.pack("!HHHHHH", qid, 0x0100 if rd else 0, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", qtype, 1)


def udp(name, qtype, qid):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query(qid, name, qtype), ("127.0.0.1", PORT))
        return s.recv(65535)


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("short TCP answer")
        data += chunk
    return data


def tcp(*questions):
    """The length-prefixed responses to `questions`, concatenated."""
    out = b""
    with socket.create_connection(("127.0.0.1", PORT), timeout=2) as s:
        for qid, (name, qtype) in enumerate(questions, start=0x4000):
            q = query(qid, name, qtype)
            s.sendall(struct.pack("!H", len(q)) + q)
            prefix = recv_exact(s, 2)
            out += prefix + recv_exact(s, struct.unpack("!H", prefix)[0])
    return out


def main():
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hosts = os.path.join(tmp, "hosts")
        with open(hosts, "w") as f:
            f.write(HOSTS)
        dnsmasq = subprocess.Popen([
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
            f"--port={PORT}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", "--local=/test/",
            "--local-ttl=300", f"--pid-file={tmp}/pid", "--user=root",
            "--cname=www.example.test,example.test,600",
            "--cname=alias.test,www.example.test,120",
        ])
        try:
            time.sleep(0.5)
            A, AAAA = 1, 28
            captures = {
                "udp-a.bin": udp("example.test", A, 0x1001),
                "udp-aaaa.bin": udp("example.test", AAAA, 0x1002),
                "udp-cname-chain-a.bin": udp("alias.test", A, 0x1003),
                "udp-cname-mixed-case.bin": udp("WwW.ExAmPlE.TeSt", A, 0x1004),
                "udp-multi-a.bin": udp("multi.test", A, 0x1005),
                "udp-nxdomain.bin": udp("missing.test", A, 0x1006),
                "udp-shared-one.bin": udp("cdn-one.test", A, 0x1007),
                "udp-shared-two.bin": udp("cdn-two.test", A, 0x1008),
                "udp-big-truncated-tc.bin": udp("big.test", A, 0x1009),
                "udp-ptr.bin": udp("10.2.0.192.in-addr.arpa", 12, 0x100a),
                "tcp-a.bin": tcp(("example.test", A)),
                "tcp-cname-chain-aaaa.bin": tcp(("alias.test", AAAA)),
                "tcp-big.bin": tcp(("big.test", A)),
                "tcp-pipelined-a-aaaa.bin": tcp(("multi.test", A), ("multi.test", AAAA)),
            }
        finally:
            dnsmasq.terminate()
            dnsmasq.wait()
    for name, data in captures.items():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
