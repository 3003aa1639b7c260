"""Load test of `latent serve` (standard library only): CLIENTS clients send REQUESTS txt2img
requests each, all at once (each client's requests a few milliseconds apart, in order), then
checks that every image came back once with the seed it asked for, that each client's requests
finished in the order it sent them (the queue is FIFO), and measures requests per minute,
latency p50/p95 and the server's memory before and after. Finally it sends more requests than
the queue holds and counts the 503 answers.

Usage: python3 tools/serve_load.py HOST:PORT SERVER_PID [CLIENTS REQUESTS STEPS QUEUE]
(start the server with --queue >= CLIENTS x REQUESTS; QUEUE is that --queue).
"""
import base64
import json
import sys
import threading
import time
import urllib.error
import urllib.request


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def post(base, body):
    request = urllib.request.Request(
        f"http://{base}/sdapi/v1/txt2img",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=3600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def main():
    base, pid = sys.argv[1], int(sys.argv[2])
    clients, per_client, steps, queue = (int(x) for x in (sys.argv[3:] + ["16", "4", "20", "64"])[:4])
    # A warm-up request, so the figures are the steady state.
    post(base, {"prompt": "a red circle", "steps": steps, "seed": 1})
    rss_before = rss_mib(pid)
    results = {}
    lock = threading.Lock()

    def one(client, k):
        seed = 1000 * client + k
        sent = time.monotonic()
        status, answer = post(base, {"prompt": "a red circle on a blue background",
                                     "steps": steps, "seed": seed})
        done = time.monotonic()
        with lock:
            results[(client, k)] = (status, answer, sent, done, seed)

    threads = []
    start = time.monotonic()
    for k in range(per_client):
        for client in range(clients):
            t = threading.Thread(target=one, args=(client, k))
            t.start()
            threads.append(t)
            time.sleep(0.005)
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    rss_after = rss_mib(pid)

    ok = [r for r in results.values() if r[0] == 200]
    assert len(ok) == clients * per_client, [r[0] for r in results.values()]
    seeds = []
    for status, answer, _, _, seed in ok:
        info = json.loads(answer["info"])
        assert info["all_seeds"] == [seed], (info["all_seeds"], seed)
        assert len(answer["images"]) == 1
        base64.b64decode(answer["images"][0], validate=True)
        seeds.append(seed)
    assert len(set(seeds)) == len(seeds), "an image came back twice"
    for client in range(clients):
        finished = [results[(client, k)][3] for k in range(per_client)]
        assert finished == sorted(finished), f"client {client}: not in FIFO order"
    latencies = sorted(r[3] - r[2] for r in ok)
    p50 = latencies[len(latencies) // 2]
    p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
    print(f"{len(ok)} requests from {clients} clients: all answered once, FIFO per client")
    print(f"{len(ok) / elapsed * 60:.1f} requests/min; latency p50 {p50:.2f} s, p95 {p95:.2f} s")
    print(f"server RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")

    # Overflow: one in flight + QUEUE waiting; the rest are refused at once.
    extra = queue + 1 + 8
    statuses = []

    def overflow(i):
        status, _ = post(base, {"prompt": "a red circle", "steps": steps, "seed": i})
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=overflow, args=(i,)) for i in range(extra)]
    for t in threads:
        t.start()
        time.sleep(0.002)
    for t in threads:
        t.join()
    print(f"overflow: {extra} at once with --queue {queue}: {statuses.count(200)} answered, "
          f"{statuses.count(503)} refused with 503, others {len(statuses) - statuses.count(200) - statuses.count(503)}")


if __name__ == "__main__":
    main()
