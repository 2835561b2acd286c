"""The aggregator survives its own I/O errors: a status file it cannot write, and a
checkpoint directory that disappears mid-round. The round's state stays in memory,
the write is retried, and the next round does not start before the round is recorded."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from fedharness import make_federation, run

from hemafed.core.learning.checkpoints import CheckpointStore
from hemafed.core.learning.models import model_hash

pytestmark = pytest.mark.slow


def test_round_is_recorded_after_the_disk_comes_back(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, n_sites=2, threshold=2, rounds=2)
    state = fed.agg_config.state_dir
    # status.json can never be written: a non-empty directory stands where the file goes.
    (state / "status.json").mkdir(parents=True)
    (state / "status.json" / "keep").write_text("x")
    ckpt_dir = state / "checkpoints"
    observed: dict[str, object] = {}

    async def break_the_disk_during_round_one() -> None:
        agg = fed.aggregator
        while agg.validator is None or agg.validator.round < 1:
            await asyncio.sleep(0.05)
        shutil.move(ckpt_dir, tmp_path / "moved")
        ckpt_dir.write_text("not a directory")  # every write into it now fails with an OSError
        while agg.record_failures < 2:
            await asyncio.sleep(0.05)
        observed["outcomes while failing"] = [o.round for o in agg.outcomes]
        observed["round while failing"] = agg.validator.round
        await asyncio.sleep(1.0)
        observed["round a second later"] = agg.validator.round
        ckpt_dir.unlink()
        shutil.move(tmp_path / "moved", ckpt_dir)

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        breaker = asyncio.create_task(break_the_disk_during_round_one())
        sites = [fed.start_site(n) for n in fed.site_configs]
        await agg_task
        await breaker
        await asyncio.gather(*sites)

    run(main())
    assert observed == {"outcomes while failing": [1], "round while failing": 1, "round a second later": 1}
    assert fed.aggregator.record_failures >= 2
    assert [o.status for o in fed.aggregator.outcomes] == ["completed", "completed"]
    store = CheckpointStore(ckpt_dir)
    assert [e["round"] for e in store.read_log()] == [1, 2]
    assert store.rounds() == [0, 1, 2]
    final = store.latest()
    assert final.meta["model_hash"] == model_hash(fed.aggregator.weights)
