#!/usr/bin/env python3
"""Regenerates web-fleet.jsonl, the quickstart's data: 4 hours of per-minute metrics from
three web hosts, with one incident (web-2's CPU saturates and its latency climbs at 02:30 for
15 minutes) and one malformed line, to show the dead-letter output. Deterministic."""
import json
import math
import random

random.seed(7)
START_MS = 1_764_028_800_000  # 2025-11-25T00:00:00Z
HOSTS = {"web-1": 38.0, "web-2": 42.0, "web-3": 35.0}
INCIDENT = range(150, 165)  # minutes 02:30 .. 02:44

lines = []
for minute in range(240):
    ts = START_MS + minute * 60_000
    for host, base in HOSTS.items():
        labels = {"host": host, "service": "checkout", "region": "eu-west-1"}
        cpu = base + 4.0 * math.sin(2 * math.pi * minute / 240) + random.gauss(0, 1.5)
        latency = 0.120 + random.gauss(0, 0.006)
        if host == "web-2" and minute in INCIDENT:
            cpu = 93.0 + random.gauss(0, 2.0)
            latency = 0.85 + random.gauss(0, 0.05)
        lines.append(json.dumps({"ts": ts, "metric": "cpu_utilization", "labels": labels, "value": round(cpu, 2)}))
        lines.append(json.dumps({"ts": ts, "metric": "http_request_duration_seconds", "labels": labels, "value": round(latency, 4)}))
    if minute == 60:
        # A record a buggy agent might send: the value is not a number.
        lines.append('{"ts": %d, "metric": "cpu_utilization", "labels": {"host": "web-3"}, "value": "n/a"}' % ts)

with open("web-fleet.jsonl", "w") as f:
    f.write("\n".join(lines) + "\n")
