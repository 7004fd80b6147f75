"""Loader throughput from local disk, from an S3 server and from an HTTP server, and range reads
vs a node-local shard cache for the loader's access pattern.

    .venv/bin/python benchmarks/remote_loader.py              # 600 synthetic utterances, 6 shards
    .venv/bin/python benchmarks/remote_loader.py --utterances 1200 --epochs 2

Starts moto's S3 server and tests/range_server.py on localhost (stopped by PID at the end),
uploads a fresh synthetic corpus to both, and runs three ``SpeechLoader`` s (``num_workers=0``:
one core, the same seed, so the same batches) over the same epochs, batch by batch in turn, so a
shared machine's load hits all alike. Remote reads are one HTTP range request per sample
(``data_pipeline.remote``). Prints audio-seconds per second of each and the ratio to local disk.

The alternative, a node-local shard cache with a size bound and LRU eviction, is measured on the
same batches: a sample whose shard is not cached first downloads the whole shard (timed, from the
same server), evicting the least recently used ones over the bound; the read itself then costs
what the local loader's read of that batch cost. Bounds: 25 %, 50 % and 100 % of the corpus.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import range_server  # noqa: E402

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.loader import SpeechLoader  # noqa: E402
from data_pipeline.remote import Remote  # noqa: E402
from data_pipeline.synth import generate  # noqa: E402


class ShardCache:
    """Whole shards downloaded on first use into a bounded LRU (what a cache would do)."""

    def __init__(self, remote: Remote, bound: int, sizes: dict[str, int]):
        self.remote, self.bound, self.sizes = remote, bound, sizes
        self.cached: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.seconds = 0.0
        self.fetched = 0

    def touch(self, url: str) -> None:
        if url in self.cached:
            self.cached.move_to_end(url)
            return
        start = time.perf_counter()
        self.remote.cat(url)
        self.seconds += time.perf_counter() - start
        self.fetched += self.sizes[url]
        self.cached[url] = None
        while sum(self.sizes[u] for u in self.cached) > self.bound and len(self.cached) > 1:
            self.cached.popitem(last=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="omni-ds-bench-remote-"))
    os.environ.setdefault("OMNI_DS_CACHE", str(tmp / "cache"))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    generate(tmp / "corpus", train_utterances=args.utterances, shard_size=args.shard_size,
             workers=1, progress=False)  # fmt: skip
    local_dir = tmp / "corpus" / "train"
    port = range_server.free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    http, http_url = range_server.start(tmp / "corpus")
    try:
        range_server.wait_listening(port, moto)
        remote = Remote(endpoint_url=f"http://127.0.0.1:{port}")
        fs = remote.filesystem("s3://bucket")
        fs.mkdir("bucket")
        fs.put(f"{local_dir}/", "bucket/train/", recursive=True)
        sources = {"local disk": str(local_dir), "S3 (moto)": "s3://bucket/train",
                   "HTTP (Range)": f"{http_url}/train"}  # fmt: skip
        cfg = dict(num_workers=0, endpoint_url=remote.endpoint_url)
        loaders = {name: SpeechLoader(DataConfig(train=[spec], **cfg), seed=0)
                   for name, spec in sources.items()}  # fmt: skip
        catalog = loaders["S3 (moto)"].catalog
        sizes = {u: fs.size(u) for u in catalog.shard_paths}
        total = sum(sizes.values())
        caches = {f"S3 cache {p}%": ShardCache(remote, total * p // 100, sizes)
                  for p in (25, 50, 100)}  # fmt: skip
        seconds = dict.fromkeys(loaders, 0.0)
        audio = 0.0
        for _ in range(args.epochs):
            iters = {name: iter(loader) for name, loader in loaders.items()}
            while True:
                batches = {}
                for name, it in iters.items():
                    start = time.perf_counter()
                    batches[name] = next(it, None)
                    seconds[name] += time.perf_counter() - start
                if batches["local disk"] is None:
                    break
                keys = batches["local disk"]["keys"]
                assert all(b["keys"] == keys for b in batches.values()), "loaders disagree"
                audio += int(batches["local disk"]["audio_lens"].sum()) / 16000
                ids = [catalog.keys.index(k) for k in keys]
                for cache in caches.values():
                    for i in ids:
                        cache.touch(catalog.shard_paths[catalog.shard_of[i]])
        base = audio / seconds["local disk"]
        print(f"corpus: {len(catalog)} utterances, {len(sizes)} shards, {total / 2**20:.1f} MiB, "
              f"{audio / args.epochs / 60:.1f} min of audio, {args.epochs} epoch(s)")  # fmt: skip
        print(f"{'source':24s} {'audio-s/s':>10s} {'vs local':>9s}")
        for name, s in seconds.items():
            print(f"{name + ', range reads':24s} {audio / s:10.0f} {audio / s / base:9.2f}")
        for name, cache in caches.items():
            s = seconds["local disk"] + cache.seconds
            print(f"{name:24s} {audio / s:10.0f} {audio / s / base:9.2f}   "
                  f"(downloaded {cache.fetched / total:.1f}x the corpus)")  # fmt: skip
    finally:
        for proc in (moto, http):
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
