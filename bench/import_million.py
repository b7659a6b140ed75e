"""Imports 1,000,000 card keys with `kami-agent stock import`, as a merchant would, and
measures: the time, the importer's peak memory, and the longest a writer beside it (a running
daemon's next ledger transaction) had to wait for the ledger while the import ran.

    python -m bench.import_million [--keys N]

The writer is a probe that takes the ledger's write lock (BEGIN IMMEDIATE ... ROLLBACK) every
5 ms, as each of the daemon's deliveries does; its longest wait is how long a delivery would
have stood still at worst.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.keybox import new_master_key


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--out", default="bench/results/import_million.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kami-import-") as folder:
        work = Path(folder)
        config = work / "config.toml"
        config.write_text(
            '[store]\npath = "kami.db"\n\n[platforms.main]\nbase_url = "http://127.0.0.1:9"\n'
            'api_key = "k"\nsecret = "platform.main.secret"\n\n[skus."GAME-100"]\n',
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAMI_")}
        env["KAMI_SECRET_STORE_KEY"] = new_master_key()
        command = [sys.executable, "-m", "agent", "--config", str(config)]
        subprocess.run([*command, "init"], env=env, check=True, capture_output=True)
        keys = work / "keys.csv"
        with keys.open("w", encoding="utf-8") as handle:
            handle.write("卡号,卡密\n")
            handle.writelines(f"C{i:010d},S-{os.urandom(8).hex()}\n" for i in range(args.keys))
        waits: list[float] = []
        done = threading.Event()

        def probe() -> None:
            conn = sqlite3.connect(work / "kami.db", timeout=30, isolation_level=None)
            while not done.is_set():
                started = time.perf_counter()
                conn.execute("BEGIN IMMEDIATE")
                waits.append(time.perf_counter() - started)
                conn.execute("ROLLBACK")
                time.sleep(0.005)
            conn.close()

        prober = threading.Thread(target=probe)
        prober.start()
        started = time.monotonic()
        result = subprocess.run(
            [*command, "stock", "import", "GAME-100", str(keys), "--batch", str(args.batch)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        elapsed = time.monotonic() - started
        done.set()
        prober.join()
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    waits.sort()
    figures = {
        "keys": args.keys,
        "batch": args.batch,
        "seconds": round(elapsed, 1),
        "keys_per_second": round(args.keys / elapsed),
        "importer_peak_rss_mb": round(peak_kib / 1024, 1),
        "writer_wait_max_ms": round(waits[-1] * 1000, 1),
        "writer_wait_p99_ms": round(waits[int(len(waits) * 0.99)] * 1000, 1),
        "writer_probes": len(waits),
        "report": result.stdout.splitlines()[0],
    }
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    Path(args.out).write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
