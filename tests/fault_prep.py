"""data_prep/make_shards.py with a kill -9 of the whole job at a chosen moment, for the
data-preparation kill test. The pipeline is the real one; only the moment chosen below is
intercepted, so the kill lands while the job runs, by construction (no polling, no timing).

    CVTKIT_KILL_PREP=SHARD:MOMENT   SIGKILL every process of the job (its process group: start it
                                    with start_new_session=True) when the shard named SHARD
                                    reaches MOMENT:
        writing     in the process writing it (a worker), once its first sample is in the
                    temporary tar: a half-written `.SHARD.tmpPID` is left behind
        recording   in the main process, after the shard was renamed into place and before its
                    manifest entry (the commit record) is written
"""
import os
import signal
import sys

from cvtkit.prep import pipeline, tar_writer
from cvtkit.prep.cli import make_shards_main

MOMENTS = ("writing", "recording")


def _spec() -> tuple[str, str]:
    shard, moment = os.environ["CVTKIT_KILL_PREP"].rsplit(":", 1)
    assert moment in MOMENTS, moment
    return shard, moment


def _kill_the_job() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def process_shard(task):
    """pipeline.process_shard, killing the job once the chosen shard's first sample is written.
    Defined here, it reaches the spawned workers by reference (they import this script as their
    __main__), so the kill happens in whichever process writes the shard."""
    shard, moment = _spec()
    if moment == "writing" and task.path.name == shard:
        real_add = tar_writer._add

        def add(tar, name, data):
            real_add(tar, name, data)
            if name.endswith(".json"):  # the last member of a sample
                tar.fileobj.flush()
                _kill_the_job()
        tar_writer._add = add
    return real_process_shard(task)


real_process_shard = pipeline.process_shard

if __name__ == "__main__":
    if os.getpgrp() != os.getpid():  # the kill takes the whole group: never a test runner's
        sys.exit("fault_prep.py must lead its own process group (start_new_session=True)")
    shard, moment = _spec()
    pipeline.process_shard = process_shard
    if moment == "recording":
        real_write = pipeline.write_json_atomic

        def write_json_atomic(path, obj):
            if path.parent.name == pipeline.MANIFEST_DIR and path.name == f"{shard}.json":
                _kill_the_job()
            return real_write(path, obj)
        pipeline.write_json_atomic = write_json_atomic
    sys.exit(make_shards_main())
