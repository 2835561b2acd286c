"""`kill -9` while the ledger is being written: after a restart the ledger loads,
holds every acknowledged round (every round that could have left the site) and never
reports less ε than was spent."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hemafed.core.privacy.ledger import PrivacyLedger

CHILD = textwrap.dedent("""
    import sys
    from hemafed.core.privacy.ledger import PrivacyLedger
    led = PrivacyLedger("crash-fed", 1e6, 1e-5, state=sys.argv[1])
    r = led.rounds
    while True:
        r += 1
        entry = led.record_round(r, 2.0, 0.01, 25, "%064x" % r)
        # Acknowledge only after record_round returned: this is the moment the site
        # would let the update leave.
        print(r, repr(entry.epsilon), flush=True)
""")


@pytest.mark.slow
def test_ledger_survives_kill_9_during_writes(tmp_path) -> None:
    rng = random.Random(1234)
    acked_rounds, acked_eps = 0, 0.0
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        first = child.stdout.readline()  # wait until it is writing
        assert first, "child died before its first round"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        lines = [first, *child.stdout.read().splitlines()]
        child.wait()
        for i, line in enumerate(lines):
            parts = line.split()
            if not parts or (len(parts) != 2 and i == len(lines) - 1):
                # the kill can cut the acknowledgement being printed (seen once in CI, "got 1" value): that round
                # was not acknowledged whole, and the bound below still allows it on disk
                continue
            assert len(parts) == 2, f"malformed acknowledgement {line!r} before the last line"
            r, eps = parts
            acked_rounds, acked_eps = max(acked_rounds, int(r)), max(acked_eps, float(eps))
        led = PrivacyLedger("crash-fed", state=tmp_path)  # must load: never torn
        assert led.rounds >= acked_rounds
        assert [e.round for e in led.entries] == list(range(1, led.rounds + 1))
        assert led.spent_epsilon() >= acked_eps
        # At most the one round being written when killed is there without an acknowledgement.
        assert led.rounds <= acked_rounds + 1
        acked_rounds = led.rounds  # a later child continues from what is on disk
    assert acked_rounds > 5
    led.record_round(acked_rounds + 1, 2.0, 0.01, 25, "0" * 64)  # and it goes on
