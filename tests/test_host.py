"""The training process's host set-up (pixeldit/host.py), checked by its effect: page faults."""

import subprocess
import sys

# allocate, touch and free a 64 MiB tensor twice; the second round's minor page faults tell whether
# the freed memory was kept for reuse or handed back to the kernel
FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from pixeldit.host import keep_freed_memory
    assert keep_freed_memory()
for round in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)  # 64 MiB, every page touched
    del x
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def second_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = second_round_faults("default"), second_round_faults("keep")
    assert default > 10_000  # 64 MiB of 4 KiB pages mapped afresh: the cost being removed
    assert kept < default / 10
