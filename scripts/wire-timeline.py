#!/usr/bin/env python3
"""Reads two loopback captures (tcpdump -s 128) of one load phase, the
gateway's HTTP port and the broker's Kafka port, and prints where the time of
the slow requests went, as seen on the wire:

* HTTP: each POST to its response on the same connection (HTTP/1.1, one
  request at a time per connection), the latency percentiles, and per half
  second the slowest request and how many took over 20 ms;
* Kafka: each produce request to its response (matched by correlation id;
  the request's header opens a segment, the response's id is at bytes 4..8),
  the same per half second;
* the worst HTTP request's neighbourhood in 20 ms bins: requests sent, their
  slowest latency, responses written, and the same for produce requests, so
  that a stall of the broker (no produce answered) is told from a stall of
  the gateway (produce answered, HTTP not) or of the load generator (fewer
  POSTs sent than the schedule).

    scripts/wire-timeline.py HTTP_PCAP HTTP_PORT KAFKA_PCAP KAFKA_PORT

Standard library only; the capture is tcpdump's classic pcap on `lo`.
"""
import collections
import struct
import sys


def packets(path):
    """(time, source port, destination port, payload length, payload head)
    of each IPv4 TCP segment in a pcap file."""
    with open(path, "rb") as f:
        header = f.read(24)
        if len(header) < 24:
            return
        magic, = struct.unpack("<I", header[:4])
        nano = magic == 0xA1B23C4D
        link, = struct.unpack("<I", header[20:24])
        offset = {1: 14, 113: 16}.get(link, 0)  # Ethernet (lo), Linux cooked
        while True:
            record = f.read(16)
            if len(record) < 16:
                return
            sec, frac, captured, _ = struct.unpack("<IIII", record)
            data = f.read(captured)
            ip = data[offset:]
            if len(ip) < 20 or ip[0] >> 4 != 4:
                continue
            ihl = (ip[0] & 15) * 4
            total, = struct.unpack(">H", ip[2:4])
            tcp = ip[ihl:]
            if len(tcp) < 20:
                continue
            sport, dport = struct.unpack(">HH", tcp[:4])
            doff = (tcp[12] >> 4) * 4
            yield (sec + frac / (1e9 if nano else 1e6), sport, dport,
                   total - ihl - doff, tcp[doff:])


def http_exchanges(path, port):
    """(sent, answered) of each request to `port`."""
    pending, out = {}, []
    for t, sport, dport, length, payload in packets(path):
        if length <= 0:
            continue
        if dport == port and payload.startswith(b"POST"):
            pending[sport] = t
        elif sport == port and payload.startswith(b"HTTP/1.1") and dport in pending:
            out.append((pending.pop(dport), t))
    return out


def produce_exchanges(path, port):
    """(sent, answered, bytes) of each produce request (API key 0) to `port`."""
    pending, out = {}, []
    for t, sport, dport, length, payload in packets(path):
        if length < 12 or len(payload) < 12:
            continue
        if dport == port:
            size, api, version, correlation = struct.unpack(">ihhi", payload[:12])
            if api == 0 and 0 <= version <= 12:
                pending[(sport, correlation)] = (t, size)
        elif sport == port:
            correlation, = struct.unpack(">i", payload[4:8])
            sent = pending.pop((dport, correlation), None)
            if sent:
                out.append((sent[0], t, sent[1]))
    return out


def percentiles(name, latencies):
    xs = sorted(latencies)
    if not xs:
        print(f"{name}: nothing matched")
        return
    at = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    print(f"{name}: n={len(xs)} p50 {at(.5):.1f} p90 {at(.9):.1f} p99 {at(.99):.1f} "
          f"p99.9 {at(.999):.1f} max {xs[-1]:.1f} ms")


def per_half_second(exchanges, start, slow_ms):
    bins = collections.defaultdict(list)
    for sent, answered, *_ in exchanges:
        bins[int((sent - start) * 2)].append((answered - sent) * 1000)
    return " ".join(f"{k / 2:g}s:{max(v):.0f}({sum(1 for x in v if x > slow_ms)})"
                    for k, v in sorted(bins.items()))


def main():
    http_pcap, http_port, kafka_pcap, kafka_port = sys.argv[1:5]
    http = http_exchanges(http_pcap, int(http_port))
    kafka = produce_exchanges(kafka_pcap, int(kafka_port))
    if not http:
        sys.exit("wire-timeline: no HTTP exchange in the capture")
    start = min([http[0][0]] + [k[0] for k in kafka[:1]])
    percentiles("HTTP on the wire (POST to response)", [(b - a) * 1000 for a, b in http])
    percentiles("Kafka produce on the wire (request to response)",
                [(b - a) * 1000 for a, b, _ in kafka])
    print("per half second, HTTP: slowest ms (requests over 20 ms)")
    print("  " + per_half_second(http, start, 20))
    print("per half second, Kafka produce: slowest ms (requests over 10 ms)")
    print("  " + per_half_second(kafka, start, 10))

    worst = max(http, key=lambda x: x[1] - x[0])
    centre = worst[0] - start
    lo, hi = centre - 0.15, centre + 0.45
    print(f"around the slowest HTTP request ({(worst[1] - worst[0]) * 1000:.1f} ms, "
          f"sent at {centre:.3f} s), 20 ms bins:")
    print("   time | HTTP sent, slowest ms, answered | produce sent, slowest ms, answered, KiB")
    rows = collections.defaultdict(lambda: [0, 0.0, 0, 0, 0.0, 0, 0])
    index = lambda t: int((t - start - lo) * 50)
    for sent, answered in http:
        if lo <= sent - start < hi:
            row = rows[index(sent)]
            row[0] += 1
            row[1] = max(row[1], (answered - sent) * 1000)
        if lo <= answered - start < hi:
            rows[index(answered)][2] += 1
    for sent, answered, size in kafka:
        if lo <= sent - start < hi:
            row = rows[index(sent)]
            row[3] += 1
            row[4] = max(row[4], (answered - sent) * 1000)
            row[6] += size
        if lo <= answered - start < hi:
            rows[index(answered)][5] += 1
    for i in sorted(rows):
        r = rows[i]
        print(f"  {lo + i / 50:6.2f} | {r[0]:4d} {r[1]:6.1f} {r[2]:4d} | "
              f"{r[3]:3d} {r[4]:6.1f} {r[5]:3d} {r[6] / 1024:6.0f}")


if __name__ == "__main__":
    main()
