"""How long the forwarder is held by a destination that stalls mid-PDU (docs/reliability.md).

Four real peers on loopback (tests/support/stalled_peer.py): one stalls inside its A-ASSOCIATE-AC, one
relays to a real SCP and stalls inside the C-STORE response, one takes a TLS connection and
never sends its ServerHello, one accepts the association and stops reading (sent a 32 MiB
radiograph instead of the results). For each, one ``forward_files``
call of a study's SR, GSPS and SC is timed in a thread; after ``--give-up`` seconds the call is
reported as still blocked and abandoned. ``--forward-py`` loads another copy of forward.py (for
example the one before the timeouts: ``git show 7a8ebcd:dicom_agent/forward.py``).

    python benchmarks/forward_stall.py [--network-timeout 1] [--connect-timeout 10] [--forward-py FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_agent import forward  # noqa: E402
from dicom_agent.config import Destination, TLSSettings, load_settings  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.support.builders import make_cxr, save  # noqa: E402
from tests.support.stalled_peer import SilentPeer, StalledPeer, StallingProxy  # noqa: E402
from tests.support.storescp import Receiver  # noqa: E402
from tests.support.studies import written_findings  # noqa: E402


def _module(path: str | None) -> ModuleType:
    if path is None:
        return forward
    spec = importlib.util.spec_from_file_location("forward_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network-timeout", type=float, default=60.0)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--acse-timeout", type=float, default=30.0)
    parser.add_argument("--dimse-timeout", type=float, default=60.0)
    parser.add_argument("--give-up", type=float, default=120.0)
    parser.add_argument("--forward-py", default=None)
    args = parser.parse_args()
    module = _module(args.forward_py)
    tmp = Path(tempfile.mkdtemp())
    settings = load_settings(paths={"out": tmp / "out"}, forward={
        "network_timeout_seconds": args.network_timeout,
        "connect_timeout_seconds": args.connect_timeout,
        "acse_timeout_seconds": args.acse_timeout,
        "dimse_timeout_seconds": args.dimse_timeout,
    })
    files = written_findings(tmp, settings)[2]
    upstream = Receiver(free_port()).start()
    peers = {"stall in A-ASSOCIATE-AC": StalledPeer(),
             "stall in C-STORE response": StallingProxy(upstream.port),
             "TLS, no ServerHello": SilentPeer(),
             "stops reading": StallingProxy(upstream.port, stall_at=None, deaf=True)}
    big = save(make_cxr(rows=4096, cols=4096), tmp / "big.dcm")
    for name, peer in peers.items():
        dest = Destination(name="p", ae_title="RESEARCHPACS", host="127.0.0.1", port=peer.port,
                           research=True, tls=TLSSettings(enabled=name.startswith("TLS")))
        outcome: list[str] = []

        def call(dest: Destination = dest, outcome: list[str] = outcome, name: str = name) -> None:
            kwargs = {"forward": settings.forward} if module is forward else {}
            try:
                sent = [big] if name == "stops reading" else files
                module.forward_files(dest, sent, calling_ae="CXRAUDIT", **kwargs)
                outcome.append("delivered")
            except Exception as exc:  # noqa: BLE001 - reported, not handled
                outcome.append(f"{type(exc).__name__}: {exc}")

        start = time.monotonic()
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(args.give_up)
        took = time.monotonic() - start
        result = outcome[0] if outcome else f"STILL BLOCKED after {args.give_up:.0f} s"
        print(f"{name}: {took:.1f} s  {result}")
        peer.close()
    upstream.stop()


if __name__ == "__main__":
    main()
