"""The training process's host set-up (pixeldit/host.py), checked by its effect: page faults."""

import subprocess
import sys

# two 48 MiB tensors alive together, touched, then freed, eight times over: blocks above glibc's
# largest dynamic mmap threshold (32 MiB), which by default are mapped afresh each time. The last
# round's minor page faults tell whether freed memory was kept for reuse or handed back to the kernel.
# The kept heap settles within the first rounds (as a training run does within its first steps), so
# only the last round is compared
FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from pixeldit.host import keep_freed_memory
    assert keep_freed_memory()
for round in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(12 << 20) for _ in range(2)]  # 2 x 48 MiB, every page touched
    del tensors
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def last_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = last_round_faults("default"), last_round_faults("keep")
    assert default > 20_000  # 96 MiB of 4 KiB pages mapped afresh every round: the cost being removed
    assert kept < default / 10


def test_setup_objects_sit_out_collections_inside_and_return_to_the_collector_after():
    import gc
    import weakref

    from pixeldit.host import exempt_setup_from_collection

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return a, weakref.ref(a)

    garbage = cycle()[1]  # unreachable already: collected on entry, not frozen
    alive, frozen = cycle()
    with exempt_setup_from_collection():
        assert garbage() is None and gc.get_freeze_count() > 1000  # torch's objects among them
        del alive  # set-up objects that become cyclic garbage inside the loop...
        gc.collect()
        assert frozen() is not None  # ...are not walked by any collection there
        made_inside = cycle()[1]
        gc.collect()
        assert made_inside() is None  # the loop's own garbage is collected as ever
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert frozen() is None
