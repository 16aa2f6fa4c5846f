"""Rules for the project's shell scripts, read from their text."""
import re
import subprocess

from helpers import REPO

# A reader that stops at its first match or line: under `set -o pipefail` the writer may then die
# of SIGPIPE, and the pipe fails although the reader found what it looked for.
EARLY_EXIT_READER = re.compile(r"\|\s*(grep\s+(-\w*[qm]|--quiet|--max-count)|head\b)")


def shell_scripts() -> list[str]:
    tracked = subprocess.run(["git", "ls-files", "*.sh", ".ci/run"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    return sorted(tracked)


def early_exit_pipes(text: str) -> list[str]:
    """The lines of a script under `pipefail` that pipe into a reader that may stop early."""
    if not re.search(r"^\s*set\s+-\w*o\s+pipefail", text, re.M):
        return []
    return [line.strip() for line in text.splitlines()
            if not line.lstrip().startswith("#") and EARLY_EXIT_READER.search(line)]


def test_no_script_under_pipefail_pipes_into_a_reader_that_stops_early():
    scripts = shell_scripts()
    assert "slurm/local_cluster.sh" in scripts and ".ci/run" in scripts
    found = {path: early_exit_pipes((REPO / path).read_text()) for path in scripts}
    assert {path: lines for path, lines in found.items() if lines} == {}


def test_the_pipe_rule_sees_the_pattern():
    fault = 'set -euo pipefail\nip addr show dev br0 | grep -qF "inet 10.0.0.1/24" || ip addr add x\n'
    assert early_exit_pipes(fault) == ['ip addr show dev br0 | grep -qF "inet 10.0.0.1/24" || ip addr add x']
    assert early_exit_pipes(fault.replace("pipefail", "errexit")) == []
    assert early_exit_pipes("set -uo pipefail\nx=$(scontrol show hostnames | head -n 1)\n") != []
    assert early_exit_pipes("set -euo pipefail\nsinfo -h | grep -cE '^idle$'\n") == []
